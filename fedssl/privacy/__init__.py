"""User-level differential privacy for every FedAvg-family algorithm.

- `clipping`: each client's update delta bounded in L2 norm, fixed or adaptive;
- `mechanism`: DP-FedAvg's Gaussian noise on the average of the clipped deltas;
- `accountant`: (epsilon, delta) of the run so far, from Google's dp-accounting.
"""
