"""`python -m benchmarks`: accuracy on real data next to SMRF and CSF, robustness to low noise,
then end-to-end speed and memory."""

from benchmarks import accuracy, low_noise, speed

accuracy.main([])
print()
low_noise.main([])
print()
speed.main([])
