"""UniPC (Zhao et al. 2023, arXiv:2302.04867): unified predictor-corrector, data prediction.

Written in k-diffusion's sigma space, where alpha = 1 and lambda = -log(sigma). Each
step evaluates the model once: the new evaluation first corrects the previous step
(UniC), then drives the next prediction (UniP). B(h) is h for "bh1" and e^h - 1 for
"bh2". The calling convention is the one described in `modules.sampling.samplers`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from modules.errors import InvalidParams
from modules.sampling.samplers import denoise, report, sigma_list


def _coefficients(h: float, rks: list[float], variant: str) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The order-p linear system of UniPC (R, b), plus h*phi_1 and B(h) for data prediction."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    r_rows, b = [], []
    factorial = 1
    nodes = np.array(rks, dtype=np.float64)
    for k in range(1, len(rks) + 1):
        r_rows.append(nodes ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return np.stack(r_rows), np.array(b), h_phi_1, b_h


def _history_terms(lambdas: list[float], outputs: list[torch.Tensor], lambda_t: float, order: int):
    """Step size h, ratios r_k and scaled differences D1_k for the `order - 1` previous points."""
    lambda_s0, m0 = lambdas[-1], outputs[-1]
    h = lambda_t - lambda_s0
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lambdas[-(k + 1)] - lambda_s0) / h
        rks.append(rk)
        d1s.append((outputs[-(k + 1)] - m0) / rk)
    return h, rks, d1s


def unipc_predict(x, sigma_s0: float, sigma_t: float, lambdas, outputs, order: int, variant: str):
    """UniP-p: predict x at sigma_t from the last `order` data predictions."""
    h, rks, d1s = _history_terms(lambdas, outputs, -math.log(sigma_t), order)
    r_mat, b, h_phi_1, b_h = _coefficients(h, [*rks, 1.0], variant)
    x_t = (sigma_t / sigma_s0) * x - h_phi_1 * outputs[-1]
    if d1s:
        rhos = [0.5] if order == 2 else np.linalg.solve(r_mat[:-1, :-1], b[:-1]).tolist()
        x_t = x_t - b_h * sum(rho * d for rho, d in zip(rhos, d1s, strict=True))
    return x_t


def unipc_correct(x, sigma_s0: float, sigma_t: float, model_t, lambdas, outputs, order: int, variant: str):
    """UniC-p: correct the step x (at sigma_s0) -> sigma_t using the model output at sigma_t."""
    h, rks, d1s = _history_terms(lambdas, outputs, -math.log(sigma_t), order)
    r_mat, b, h_phi_1, b_h = _coefficients(h, [*rks, 1.0], variant)
    rhos = [0.5] if order == 1 else np.linalg.solve(r_mat, b).tolist()
    x_t = (sigma_t / sigma_s0) * x - h_phi_1 * outputs[-1]
    res = rhos[-1] * (model_t - outputs[-1])
    for rho, d in zip(rhos[:-1], d1s, strict=True):
        res = res + rho * d
    return x_t - b_h * res


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                 order: int = 3, variant: str = "bh2", lower_order_final: bool = True) -> torch.Tensor:
    """UniPC multistep (UniP-p predictor + UniC corrector), orders 1-3, variants bh1/bh2.

    Warm-up uses increasing order; with `lower_order_final` the last steps drop to lower
    order, and the step to sigma 0 returns the denoised estimate (as diffusers' UniPC
    with final_sigmas_type="zero").
    """
    if order not in (1, 2, 3):
        raise InvalidParams(f"UniPC order must be 1, 2 or 3, got {order}.")
    if variant not in ("bh1", "bh2"):
        raise InvalidParams(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}.")
    sig = sigma_list(sigmas)
    n = len(sig) - 1
    lambdas: list[float] = []
    outputs: list[torch.Tensor] = []
    x_prev, prev_order = None, 0
    for i in range(n):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        if x_prev is not None:
            x = unipc_correct(x_prev, sig[i - 1], sigma, denoised, lambdas, outputs, prev_order, variant)
        report(callback, x, i, sigma, sigma, denoised)
        lambdas = [*lambdas, -math.log(sigma)][-order:]
        outputs = [*outputs, denoised][-order:]
        if sigma_next == 0:
            x = denoised
            continue
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, len(outputs))
        x_prev, prev_order = x, this_order
        x = unipc_predict(x, sigma, sigma_next, lambdas, outputs, this_order, variant)
    return x
