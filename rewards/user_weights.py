"""Low-dimensional user weights over a learned reward basis: the population prior and few-shot adaptation.

A backbone maps (prompt, response) to D basis rewards phi(x, y); user u's reward is r_u = w_u . phi (LoRe,
arXiv:2504.14439 eq. 1; PAL-A, arXiv:2406.08469 §3 with points as prototypes). The user's Bradley-Terry label
model is then a logistic regression on basis differences d = phi(x, y+) - phi(x, y-):

    P(y+ > y- | u) = sigmoid(w_u . d)                                                            (BT, eq. 1 of LoRe)

The population prior over w is fitted on the training users' learned weights (empirical Bayes, research
reward_models.md §7.2): one Gaussian N(mu, Sigma), or a mixture of C Gaussians when the population has clusters
(PAL's prototypes). A new user is adapted from k labelled pairs WITHOUT touching the backbone:

    w_hat = argmax_w  sum_i log sigmoid(w . d_i) - 1/2 (w - mu)^T Sigma^-1 (w - mu)           (MAP, per component)

by damped Newton steps (the objective is strictly concave, so ~10 steps reach 1e-8). With k = 0 the answer is
the prior mean, i.e. the population model; with the prior shrinking every estimate toward it, a handful of pairs
cannot drag a user far from the population (§6.4: naive per-user fits lose to the population at m <= 4).
With a mixture, each component gives a MAP and a Laplace evidence; the prediction is the evidence-weighted mix of
the components' probabilities.

Everything here is tensors in, tensors out, float64 (D <= ~32, so the cost is nothing next to the backbone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Prior:
    """A mixture of C Gaussians over user weights (C = 1: the N(mu, Sigma) of LoRe/PAL-style priors).

    log_weights (C,), means (C, D), covariances (C, D, D), all float64.
    """

    log_weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor

    def to_dict(self) -> dict:
        return {"log_weights": self.log_weights.tolist(), "means": self.means.tolist(),
                "covariances": self.covariances.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Prior:
        as64 = lambda x: torch.tensor(x, dtype=torch.float64)
        return cls(as64(d["log_weights"]), as64(d["means"]), as64(d["covariances"]))


def fit_gaussian(weights: torch.Tensor, ridge: float = 1e-3) -> Prior:
    """N(mean, cov + ridge * I) of the rows of `weights` (U, D): one component."""
    w = weights.double()
    cov = torch.cov(w.T).reshape(w.shape[1], w.shape[1]) + ridge * torch.eye(w.shape[1], dtype=torch.float64)
    return Prior(torch.zeros(1, dtype=torch.float64), w.mean(0, keepdim=True), cov[None])


def fit_mixture(weights: torch.Tensor, components: int, iters: int = 100, ridge: float = 1e-3,
                seed: int = 0) -> Prior:
    """Gaussian mixture over the rows of `weights` (U, D) by EM, initialized at k-means++-style seeds.

    The ridge keeps each covariance invertible when a component holds fewer than D users.
    """
    if components == 1:
        return fit_gaussian(weights, ridge)
    w = weights.double()
    n, d = w.shape
    if n < components:
        raise ValueError(f"fit_mixture: {n} users cannot fit {components} components")
    gen = torch.Generator().manual_seed(seed)
    means = w[torch.randint(n, (1,), generator=gen)]
    for _ in range(components - 1):  # k-means++ seeding: far-away users are likelier seeds
        dist = torch.cdist(w, means).min(1).values ** 2
        means = torch.cat([means, w[torch.multinomial(dist / dist.sum(), 1, generator=gen)]])
    eye = torch.eye(d, dtype=torch.float64)
    covs = (torch.cov(w.T) + ridge * eye).expand(components, d, d).clone()
    log_pi = torch.full((components,), -math.log(components), dtype=torch.float64)
    for _ in range(iters):
        resp = torch.softmax(log_pi + _gaussian_logpdf(w, means, covs), dim=1)  # (n, C) E-step
        mass = resp.sum(0) + 1e-9
        log_pi = (mass / n).log()
        means = (resp.T @ w) / mass[:, None]
        centred = w[None] - means[:, None]  # (C, n, d)
        covs = torch.einsum("cn,cni,cnj->cij", resp.T, centred, centred) / mass[:, None, None] + ridge * eye
    return Prior(log_pi, means, covs)


def _gaussian_logpdf(w: torch.Tensor, means: torch.Tensor, covs: torch.Tensor) -> torch.Tensor:
    """log N(w_n | mean_c, cov_c): (n, C) for w (n, D), means (C, D), covs (C, D, D)."""
    dist = torch.distributions.MultivariateNormal(means, covariance_matrix=covs)
    return dist.log_prob(w[:, None, :])


def map_weights(diffs: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor, steps: int = 25,
                tol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAP of prior-shrunk logistic regression (the MAP equation in the module docstring).

    diffs (k, D): basis differences d_i = phi(chosen_i) - phi(rejected_i) of the user's labelled pairs (k may be 0).
    mean (D,), precision (D, D): the Gaussian prior. Returns (w (D,), Hessian of the negative log posterior at w
    (D, D), log posterior at w ()). Damped Newton: halve the step until the objective increases.
    """
    d = diffs.double()
    w = mean.double().clone()
    objective = lambda v: torch.nn.functional.logsigmoid(d @ v).sum() - 0.5 * (v - mean) @ precision @ (v - mean)
    value = objective(w)
    for _ in range(steps):
        p = torch.sigmoid(d @ w)  # (k,)
        grad = d.T @ (1 - p) - precision @ (w - mean)
        hess = (d * (p * (1 - p))[:, None]).T @ d + precision
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        candidate = objective(w + step)
        while candidate < value and t > 1e-6:
            t /= 2
            candidate = objective(w + t * step)
        if candidate < value:  # no ascent direction left at float64 precision
            break
        w, gain, value = w + t * step, candidate - value, candidate
        if gain < tol:
            break
    p = torch.sigmoid(d @ w)
    return w, (d * (p * (1 - p))[:, None]).T @ d + precision, value


def adapt(diffs: torch.Tensor, prior: Prior) -> tuple[torch.Tensor, torch.Tensor]:
    """A new user's weights from k labelled pairs: per component the MAP w_c (C, D) and the posterior log
    responsibility (C,) from the Laplace evidence  log pi_c + log p(labels, w_c) + 1/2 log|P_c| - 1/2 log|H_c|."""
    ws, logs = [], []
    for log_pi, mean, cov in zip(prior.log_weights, prior.means, prior.covariances, strict=True):
        precision = torch.linalg.inv(cov)
        w, hess, value = map_weights(diffs, mean, precision)
        gaussian_norm = -0.5 * torch.logdet(cov) - 0.5 * mean.numel() * math.log(2 * math.pi)
        laplace = 0.5 * mean.numel() * math.log(2 * math.pi) - 0.5 * torch.logdet(hess)
        ws.append(w)
        logs.append(log_pi + value + gaussian_norm + laplace)
    return torch.stack(ws), torch.log_softmax(torch.stack(logs), dim=0)


def predictive_margin(targets: torch.Tensor, ws: torch.Tensor, log_resp: torch.Tensor) -> torch.Tensor:
    """Logit of P(first > second) for target basis differences (n, D): the components' sigmoid(w_c . d) mixed by
    their responsibilities. One component: exactly w . d."""
    logits = targets.double() @ ws.T  # (n, C)
    if ws.shape[0] == 1:
        return logits[:, 0]
    log_p = torch.logsumexp(torch.nn.functional.logsigmoid(logits) + log_resp, dim=1)
    log_q = torch.logsumexp(torch.nn.functional.logsigmoid(-logits) + log_resp, dim=1)
    return log_p - log_q
