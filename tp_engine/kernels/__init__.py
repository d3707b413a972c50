"""Small C kernels for the CPU, built on first use with the machine's C compiler (build.py).
Every kernel has a torch path beside it: without a compiler the engine is slower, not broken."""
