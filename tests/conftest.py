"""The suite runs on two pytest workers (pytest.ini: -n 2, pytest-xdist), each test and every
script it launches on one thread: two processes at two threads each on a 2-core machine run
3-4x slower than alone, one thread each holds. Set before anything imports torch."""
import os

os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
