"""The math: NoProp-DT's schedule, SNR weights, posterior coefficients and closed-form
sampling, pure float64 functions (no modules, no training)."""
