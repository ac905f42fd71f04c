"""Native CPU speed: the C kernels built and wrapped, and the fast modules swapped in at load."""
