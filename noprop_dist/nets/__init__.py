"""Networks that only compute: the DT block and head (Figure 6), the baselines, the
time-conditioned network of CT/FM and the inference chains (Eq. 3, CT/FM integration)."""
