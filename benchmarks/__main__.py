"""`python -m benchmarks`: accuracy on real data next to CSF, then end-to-end speed and memory."""

from benchmarks import accuracy, speed

accuracy.main([])
print()
speed.main([])
