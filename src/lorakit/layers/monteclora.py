"""MonteCLoRA (Monte Carlo LoRA, PEFT's monteclora_config) as a variant object, with its sampler.

In training, each forward replaces A by a weighted average of `num_samples` perturbed copies,
A' = (Σ_n w_n (Aᵀ + ε_n))ᵀ, where the noise ε_n (in, r) is drawn through a learned diagonal
covariance (Wishart-reparameterised, prior `std_prior`) and the weights w (num_samples,) through a
Dirichlet-like softmax (prior `expert_weights_prior`); a KL term plus an optional entropy term
(variational_loss) regularises both. In eval mode the layer is plain LoRA, and merging merges plain
s·B·A, as in PEFT.

Numerics and random draws follow PEFT 0.21.2 (peft/tuners/lora/monteclora.py): the sampler draws its
priors (rand) at creation and pre-draws `buffer_size` standard-normal / Bartlett samples, one consumed
per training forward and refilled when spent, so the same seed gives PEFT's weights and outputs.
The sampler lives in the layer's `lora_monteclora_sampler[name]` (PEFT's state-dict keys).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions.wishart import Wishart

from ..errors import LorakitError
from .layer import LoraLayer
from .variant import Variant

SAMPLERS = "lora_monteclora_sampler"  # the layer's ModuleDict of samplers, PEFT's name
EPS_VAR, EPS_DIRICHLET = 1e-3, 1e-6


class Sampler(nn.Module):
    """The variational parameters of one adapter of one layer; forward() gives (noise (S, in, r), weights (S,))."""

    def __init__(self, in_features: int, r: int, num_samples: int, use_entropy: bool, dirichlet_prior: float,
                 sample_scaler: float, kl_loss_weight: float, buffer_size: int, device, dtype):
        super().__init__()
        self.in_features, self.r, self.num_samples = in_features, r, num_samples
        self.use_entropy, self.dirichlet_prior = use_entropy, dirichlet_prior
        self.sample_scaler, self.kl_loss_weight, self.buffer_size = sample_scaler, kl_loss_weight, buffer_size
        self.std_prior = nn.Parameter(torch.rand(r, dtype=dtype).to(device))  # (r,) log std
        self.expert_weights_prior = nn.Parameter(torch.rand(num_samples, dtype=dtype).to(device))  # (S,) log alpha
        self.register_buffer("gaussian_var_prior", torch.eye(r, dtype=dtype, device=device))  # (r, r)
        self.register_buffer("expert_weights", torch.ones(num_samples, dtype=dtype, device=device) / num_samples)
        self._dtype, self._device = dtype, torch.device(device)
        self._wishart = Wishart(df=r, scale_tril=torch.eye(r, device=device))
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._index = 0
        self._refill()

    def _refill(self) -> None:
        """buffer_size draws of (z_mvn (S, in, r), z_wishart (r, r), z_dirichlet (S,)), in PEFT's order."""
        with torch.no_grad():
            size = (self.buffer_size, self.num_samples, self.in_features, self.r)
            z_mvn = torch.randn(size, device=self._device, dtype=self._dtype)
            z_dir = torch.randn((self.buffer_size, self.num_samples), device=self._device, dtype=self._dtype)
            self._buffer = [(z_mvn[i], self._wishart._bartlett_sampling(torch.Size()).to(self._device, self._dtype),
                             z_dir[i]) for i in range(self.buffer_size)]
        self._index = 0

    def _next(self):
        if self._index >= self.buffer_size:
            self._refill()
        self._index += 1
        return self._buffer[self._index - 1]

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        dev, dtype = self.std_prior.device, self.std_prior.dtype
        z_mvn, z_wishart, z_dir = (z.to(dev, dtype) for z in self._next())
        std = torch.diag(torch.exp(self.std_prior))  # (r, r)
        var = torch.diag(torch.clip((std @ z_wishart @ std.T).diag(), min=EPS_VAR))  # (r, r), diagonal
        self.gaussian_var_prior = var  # PEFT keeps the last draw here (and its KL reads it)
        L = torch.linalg.cholesky(var.float()).to(var.dtype)
        noise = self.sample_scaler * torch.nan_to_num(torch.einsum("eio,op->eip", z_mvn, L), nan=EPS_VAR)
        self.expert_weights = torch.softmax(self._dirichlet_logits(torch.exp(self.expert_weights_prior), z_dir), -1)
        return noise, self.expert_weights  # (S, in, r), (S,)

    def _dirichlet_logits(self, alpha: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The Laplace (softmax-basis) approximation of Dirichlet(alpha): mean + Cholesky(Σ)·z, (S,)."""
        n = self.num_samples
        alpha = torch.clamp(alpha, min=EPS_DIRICHLET)
        mu = torch.log(alpha) - torch.log(alpha).mean()
        diag = torch.clamp(1 / alpha * (1 - 2 / n) + 1 / n ** 2 * (1 / alpha).sum(), min=EPS_DIRICHLET)
        sigma = torch.diag(diag) + EPS_DIRICHLET * torch.eye(n, device=alpha.device)
        try:
            L = torch.linalg.cholesky(sigma.float())
        except torch.linalg.LinAlgError:
            sigma = sigma + 1e-4 * torch.eye(n, device=alpha.device)
            L = torch.linalg.cholesky(sigma.float())
        return L.to(sigma.dtype) @ z + mu

    def variational_loss(self):
        """(kl_loss_weight · (KL_dirichlet + KL_wishart + KL_gaussian), entropy term); (0.0, 0.0) in eval."""
        if not self.training:
            return 0.0, 0.0
        n, r = self.num_samples, self.r
        alpha2 = torch.exp(self.expert_weights_prior)  # (S,)
        alpha1 = torch.full((n,), float(self.dirichlet_prior), device=alpha2.device)
        gamma = lambda t: torch.lgamma(t).exp()  # noqa: E731 - PEFT's exp(lgamma), kept for equal rounding
        kl_dir = (torch.log(gamma(alpha2.sum()) / gamma(alpha1.sum())) + torch.log(gamma(alpha2) / gamma(alpha1)).sum()
                  + ((alpha2 - alpha1) * (torch.digamma(alpha2) - torch.digamma(alpha2.sum()))).sum())
        std = torch.diag(torch.exp(self.std_prior))
        v = torch.diag((std @ std.T).diag())
        kl_wish = 0.5 * (-torch.log(v).trace() * r + v.trace() * r - r ** 2)
        g = torch.clamp(self.gaussian_var_prior, min=1e-6)
        kl_gauss = n * 0.5 * (g.trace() - torch.log(g).trace() - r)
        entropy = (self.expert_weights ** 2).sum() if self.use_entropy else 0
        return self.kl_loss_weight * (kl_dir + kl_wish + kl_gauss), entropy


class MonteCLoRA(Variant):
    """The variant: sampled A in training, plain LoRA in eval and in merges."""

    name = "monteclora"

    def __init__(self, num_samples: int = 8, use_entropy: bool = False, dirichlet_prior: float = 0.1,
                 sample_scaler: float = 1e-4, kl_loss_weight: float = 1e-5, buffer_size: int = 150):
        self.options = dict(num_samples=num_samples, use_entropy=use_entropy, dirichlet_prior=dirichlet_prior,
                            sample_scaler=sample_scaler, kl_loss_weight=kl_loss_weight, buffer_size=buffer_size)

    def check(self, layer: LoraLayer) -> None:
        if layer.kind not in ("linear", "conv1d") or layer.base_kind.quantized:
            raise LorakitError(f"monteclora_config: MonteCLoRA adapts linear layers only (as in PEFT), not "
                               f"{layer._label()}; leave that layer out of target_modules")

    def added(self, layer: LoraLayer, name: str) -> None:
        if not hasattr(layer, SAMPLERS):
            layer.add_module(SAMPLERS, nn.ModuleDict())
        A = layer.lora_A[name]
        if not A.is_meta:  # low_cpu_mem_usage: created at the first forward, as PEFT does
            getattr(layer, SAMPLERS)[name] = self._sampler(layer, name)

    def _sampler(self, layer: LoraLayer, name: str) -> Sampler:
        A = layer.lora_A[name]
        return Sampler(layer.in_features, A.shape[0], device=A.device, dtype=A.dtype, **self.options)

    def upcast(self, layer: LoraLayer, name: str) -> None:
        """fp32 priors on a half-precision base (PEFT casts the sampler's parameters, not its buffers)."""
        samplers = getattr(layer, SAMPLERS, {})
        for p in samplers[name].parameters() if name in samplers else ():
            p.data = p.data.float()

    def stores(self, layer: LoraLayer) -> tuple:
        return (getattr(layer, SAMPLERS),) if hasattr(layer, SAMPLERS) else ()

    def deleted(self, layer: LoraLayer, name: str) -> None:
        samplers = getattr(layer, SAMPLERS, None)
        if samplers is not None and name in samplers:
            del samplers[name]

    def apply(self, layer, name, x, result, dropout, owned):
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        samplers = getattr(layer, SAMPLERS)
        if name not in samplers:
            samplers[name] = self._sampler(layer, name)
        weight = A
        if layer.training:
            x = dropout(x)  # before the draw: a buffer refill draws from the RNG after the mask, as in PEFT
            noise, w = samplers[name]()  # (S, in, r), (S,)
            if torch.isnan(noise).any() or torch.isnan(w).any():
                warnings.warn("Monteclora sampling produced NaNs, using base weights.", stacklevel=2)
            else:
                weight = torch.einsum("n,nij->ij", w, A.T + torch.nan_to_num(noise, nan=0.0)).T  # (r, in)
        return result + F.linear(F.linear(x, weight), B) * s, True

    def merged_weight(self, layer, name, W, base=None):
        return W + layer.delta_weight(name).to(W.dtype)

    def unmerged_weight(self, layer, name, W, forget=True):
        return W - layer.delta_weight(name).to(W.dtype)


def variational_loss(model: nn.Module, names: list[str]):
    """PEFT's _get_monteclora_loss: the mean over samplers of `names` of (KL + entropy); 0.0 without any."""
    total, count = 0.0, 0
    for module in model.modules():
        samplers = getattr(module, SAMPLERS, None) if isinstance(module, LoraLayer) else None
        for name in names if samplers is not None else []:
            if name in samplers:
                kl, entropy = samplers[name].variational_loss()
                total, count = total + kl + entropy, count + 1
    return total / count if count else 0.0
