r"""TrAct: the first layer of a vision model trained as if its pre-activations were the parameters.

Paper: Petersen, Borgelt, Ermon, "TrAct: Making First-layer Pre-Activations Trainable", NeurIPS 2024, arXiv
`2410.23970 <https://arxiv.org/abs/2410.23970>`_. Official code: https://github.com/Felix-Petersen/tract
(``src/tract.py``; also on PyPI as ``torch_tract``).

The gradient of a first layer :math:`Z = XW^\top + b` with respect to its weight, :math:`G^\top X`, is
proportional to the input pixels, so bright, dark or high-contrast images move the weights more than others.
TrAct instead takes a gradient step on the pre-activations, :math:`Z - \eta G`, and returns the weight change
that realises it best in the least-squares sense, regularised by :math:`\lambda`. Its closed form replaces the
weight gradient by

.. math::

    \nabla_W^{\text{TrAct}} = G^\top X \Bigl(\tfrac{1}{b} X^\top X + \lambda I_n\Bigr)^{-1}
    = G^\top \Bigl(\tfrac{1}{b} X X^\top + \lambda I_b\Bigr)^{-1} X ,

where the rows of :math:`X \in \mathbb R^{b\times n}` are the layer's inputs (for a convolution: its input
patches, :math:`b = N \cdot H_{out} W_{out}`, :math:`n = C_{in} k_h k_w`; for a linear layer on ``(..., n)``
inputs every leading index is a row) and :math:`G = \partial L / \partial Z \in \mathbb R^{b\times m}`. The first
form solves an :math:`n\times n` system and is used when :math:`b \ge n`; the second (the Woodbury identity, the
same matrix pushed through :math:`X`) solves a :math:`b\times b` one and is used when :math:`b < n`, as in the
official code. Both matrices are symmetric positive definite with smallest eigenvalue :math:`\ge\lambda`, so they
are solved by a Cholesky factorisation, never inverted. Everything else is the plain layer's: the output, the
input gradient :math:`G W` and the bias gradient :math:`\sum_{\text{rows}} G` are bit for bit those of
``nn.Linear`` / ``nn.Conv2d``. Any optimizer then consumes the new weight gradient.

Two limits, both checked by the tests: :math:`\lambda \nabla_W^{\text{TrAct}} \to G^\top X` as
:math:`\lambda\to\infty` (plain training with the learning rate divided by :math:`\lambda`), and for whitened
inputs (:math:`X^\top X / b = I`) :math:`\nabla_W^{\text{TrAct}} = G^\top X / (1 + \lambda)`.

Hyperparameters (defaults): ``lam`` :math:`\lambda` = 0.1, a finite number > 0 (the method's only hyperparameter;
the official README recommends 0.1). Larger :math:`\lambda` moves towards plain training. The paper trains with
the baseline's optimizer settings unchanged (e.g. ResNet-18 on CIFAR-10 with SGD, momentum 0.9, lr 0.08, cosine
schedule).

Choices and differences from the official code:

- the official ``inv_type="cholesky_inverse"`` passes the matrix itself to ``torch.cholesky_inverse``, which
  expects its Cholesky factor (a wrong result); its default explicitly inverts the matrix. Here both branches are
  Cholesky solves. The factorisation is not checked (a check is a device-to-host synchronisation); it could fail,
  giving NaN, only for :math:`\lambda` below rounding level relative to :math:`\lVert X^\top X / b\rVert`;
- the Woodbury branch solves :math:`(XX^\top/b + \lambda I)\,Y = G` and returns :math:`Y^\top X`, equal to the
  official :math:`\frac1\lambda G^\top[I - K(K+\lambda I)^{-1}]X`, :math:`K = XX^\top/b`, without its subtraction;
- ``nn.Conv1d`` is supported too (the same mathematics on 1-D patches; the official code has Linear and Conv2d
  only). Dilation, groups and a ``padding_mode`` other than ``"zeros"`` raise ``NotImplementedError`` (the
  official code silently drops them); ``padding="same"`` works for odd kernels;
- the weight gradient is computed in float32 for bfloat16/float16 inputs and parameters. Under
  ``torch.autocast`` the layer runs in the autocast dtype like the plain layer, and the TrAct solve is float32;
- the wrapper takes the layer's own ``weight`` and ``bias`` Parameters (no copies), so optimizers, checkpoints
  and ``state_dict`` keys are unchanged by wrapping.

Coming from a plain first layer: wrap it (only the first layer, as in the paper) and keep the optimizer::

    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = TrAct(model.conv1)          # or: TrAct.wrap(model, "conv1")
    opt = torch.optim.SGD(model.parameters(), lr=0.08, momentum=0.9)

Cost: the forward saves the layer input (as the plain layer does); the backward forms the patches, an
:math:`n\times n` (or :math:`b\times b`) Gram matrix and one Cholesky solve. See ``benchmarks/tract_time.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from optimlab._core.optimizer import state_dtype
from optimlab._core.validation import Interval, check_hyperparameters
from optimlab.registry import MethodInfo, register

__all__ = ["TrAct", "tract", "tract_weight_grad"]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_SUPPORTED_NAMES = "nn.Linear, nn.Conv1d or nn.Conv2d"
HYPERPARAMETERS = {"lam": Interval(0.0, math.inf, low_closed=False, high_closed=False)}  # λ: finite, > 0


# -- the functional core ------------------------------------------------------------------------------------
def _regularized_gram(a: Tensor, b: Tensor, lam: float, rows: int) -> Tensor:
    """``a @ b / rows + lam * I`` in one fused call."""
    shift = torch.eye(a.shape[0], dtype=a.dtype, device=a.device).mul_(lam)
    return torch.addmm(shift, a, b, alpha=1.0 / rows)


def _solve_spd(matrix: Tensor, rhs: Tensor) -> Tensor:
    """``matrix⁻¹ rhs`` for a symmetric positive definite ``matrix`` (unchecked, so no host synchronisation)."""
    factor, _ = torch.linalg.cholesky_ex(matrix)
    return torch.cholesky_solve(rhs, factor)


def _direct(plain_grad: Tensor, inputs: Tensor, lam: float) -> Tensor:
    """``P (XᵀX/b + λI)⁻¹`` from the plain weight gradient ``P = GᵀX`` (m×n): an n×n solve."""
    gram = _regularized_gram(inputs.T, inputs, lam, inputs.shape[0])
    return _solve_spd(gram, plain_grad.T).T  # the matrix is symmetric: P A⁻¹ = (A⁻¹ Pᵀ)ᵀ


def _woodbury(grad_outputs: Tensor, inputs: Tensor, lam: float) -> Tensor:
    """``Gᵀ (XXᵀ/b + λI)⁻¹ X``: a b×b solve, cheaper than the n×n one when b < n."""
    kernel = _regularized_gram(inputs, inputs.T, lam, inputs.shape[0])
    return _solve_spd(kernel, grad_outputs).T @ inputs


def tract_weight_grad(inputs: Tensor, grad_outputs: Tensor, lam: float = 0.1) -> Tensor:
    """TrAct's weight gradient :math:`G^\\top X (X^\\top X/b + \\lambda I)^{-1}` (m×n) from the layer inputs as rows,
    ``inputs`` :math:`X` (b×n), and the output gradients ``grad_outputs`` :math:`G` (b×m).

    Takes the n×n solve when b ≥ n and the b×b (Woodbury) one when b < n; computes in float32 for 16-bit inputs
    and returns the inputs' dtype. ``lam`` must be a finite number > 0 (``ValueError`` otherwise): at 0 the matrix
    may be singular (NaN), and below 0 it is not positive definite (a wrong, finite result)."""
    check_hyperparameters(HYPERPARAMETERS, {"lam": lam})
    if inputs.dim() != 2 or grad_outputs.dim() != 2 or inputs.shape[0] != grad_outputs.shape[0]:
        raise ValueError(
            f"tract_weight_grad takes inputs (b, n) and grad_outputs (b, m) with the same b; got "
            f"{tuple(inputs.shape)} and {tuple(grad_outputs.shape)}"
        )
    dtype = state_dtype(inputs)
    x, g = inputs.to(dtype), grad_outputs.to(dtype)
    rows, features = x.shape
    out = _direct(g.T @ x, x, lam) if rows >= features else _woodbury(g, x, lam)
    return out.to(inputs.dtype)


# -- layer geometry -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Geometry:
    """How a weight acts on its input: ``dims`` 0 for a linear layer, 1 or 2 for a convolution."""

    dims: int
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.dims == 0:
            return F.linear(x, weight, bias)
        conv = F.conv1d if self.dims == 1 else F.conv2d
        return conv(x, weight, bias, self.stride, self.padding)

    def patches(self, x: Tensor, kernel_size: tuple[int, ...]) -> Tensor:
        """The rows of X: (N·L, C·k…) for a convolution, ordered like the flattened weight and the output."""
        if self.dims == 0:
            return x.reshape(-1, x.shape[-1])
        if self.dims == 1:  # a 1-D convolution is a 2-D one on a height-1 image
            x, kernel_size, stride, padding = x.unsqueeze(2), (1, *kernel_size), (1, *self.stride), (0, *self.padding)
        else:
            stride, padding = self.stride, self.padding
        cols = F.unfold(x, kernel_size, padding=padding, stride=stride)  # (N, C·k…, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def rows(self, grad_output: Tensor) -> Tensor:
        """The rows of G, (b, m), in the order of :meth:`patches`."""
        if self.dims == 0:
            return grad_output.reshape(-1, grad_output.shape[-1])
        return grad_output.flatten(2).transpose(1, 2).reshape(-1, grad_output.shape[1])


def _conv_geometry(dims: int, kernel_size: tuple[int, ...], stride: Any, padding: Any) -> _Geometry:
    stride = (stride,) * dims if isinstance(stride, int) else tuple(stride)
    if padding == "valid":
        padding = 0
    elif padding == "same":
        if any(k % 2 == 0 for k in kernel_size):
            raise NotImplementedError(
                f"TrAct supports padding='same' only for odd kernel sizes (got {kernel_size}); pad the input "
                "explicitly and use padding=0"
            )
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions")
        padding = tuple(k // 2 for k in kernel_size)
    padding = (padding,) * dims if isinstance(padding, int) else tuple(padding)
    if len(stride) != dims or len(padding) != dims:
        raise ValueError(f"stride and padding need {dims} entries each; got {stride} and {padding}")
    return _Geometry(dims, stride, padding)


# -- autograd -----------------------------------------------------------------------------------------------
class _TrActFunction(torch.autograd.Function):
    """The layer's forward; in backward, the plain input and bias gradients and TrAct's weight gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, geometry: _Geometry, lam: float) -> Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # cast as autocast would for the plain layer, so that the backward sees one dtype throughout
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.lam, ctx.bias_sizes = geometry, lam, None if bias is None else list(bias.shape)
        return geometry.forward(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        geometry: _Geometry = ctx.geometry
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_output = grad_output.to(x.dtype)
        dtype = state_dtype(x)
        rows_x = geometry.patches(x, tuple(weight.shape[2:])).to(dtype) if need_weight else None
        direct = need_weight and rows_x.shape[0] >= rows_x.shape[1]
        # a 16-bit convolution backward would round GᵀX to 16 bits: take it from the float32 rows instead
        plain_from_conv = direct and dtype == x.dtype
        grad_input = grad_weight = grad_bias = plain_weight = None
        if geometry.dims == 0:
            rows_g = grad_output.reshape(-1, grad_output.shape[-1])
            if need_input:
                grad_input = (rows_g @ weight).reshape(x.shape)
            if need_bias:
                grad_bias = rows_g.sum(0)
        else:  # the kernels autograd runs for the plain convolution, so these gradients are bit for bit its own
            grad_input, plain_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_output, x, weight, ctx.bias_sizes, list(geometry.stride), list(geometry.padding),
                [1] * geometry.dims, False, [0] * geometry.dims, 1, [need_input, plain_from_conv, need_bias],
            )  # fmt: skip
            plain_weight = plain_weight if plain_from_conv else None  # some backends fill it regardless of the mask
        if need_weight:
            if direct:
                if plain_weight is None:
                    plain_weight = geometry.rows(grad_output).to(dtype).T @ rows_x
                grad_weight = _direct(plain_weight.reshape(weight.shape[0], -1), rows_x, ctx.lam)
            else:
                grad_weight = _woodbury(geometry.rows(grad_output).to(dtype), rows_x, ctx.lam)
            grad_weight = grad_weight.reshape(weight.shape)  # autograd casts it to the parameter's dtype
        return grad_input, grad_weight, grad_bias, None, None


def tract(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    lam: float = 0.1,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
) -> Tensor:
    """``F.linear`` (2-D ``weight``), ``F.conv1d`` (3-D) or ``F.conv2d`` (4-D) whose weight receives TrAct's
    gradient; ``stride`` and ``padding`` as in those (convolutions only). Output, input and bias gradients are the
    plain function's."""
    check_hyperparameters(HYPERPARAMETERS, {"lam": lam})
    if weight.dim() not in (2, 3, 4):
        raise ValueError(f"tract takes a 2-D (linear), 3-D (conv1d) or 4-D (conv2d) weight, got {weight.dim()}-D")
    if weight.dim() == 2:
        geometry = _Geometry(0)
    else:
        geometry = _conv_geometry(weight.dim() - 2, tuple(weight.shape[2:]), stride, padding)
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return geometry.forward(input, weight, bias)
    unbatched = geometry.dims > 0 and input.dim() == geometry.dims + 1
    out = _TrActFunction.apply(input.unsqueeze(0) if unbatched else input, weight, bias, geometry, float(lam))
    return out.squeeze(0) if unbatched else out


# -- the layer ----------------------------------------------------------------------------------------------
class TrAct(nn.Module):
    __doc__ = __doc__

    def __init__(self, layer: nn.Linear | nn.Conv1d | nn.Conv2d, lam: float = 0.1) -> None:
        super().__init__()
        if not isinstance(layer, SUPPORTED_LAYERS):
            raise TypeError(f"TrAct wraps an {_SUPPORTED_NAMES} (the model's first layer), got {type(layer).__name__}")
        if isinstance(layer.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"{type(layer).__name__} is not initialized yet: run one forward pass, then wrap it")
        if isinstance(layer, nn.Linear):
            self.stride: tuple[int, ...] = ()
            self.padding: tuple[int, ...] = ()
        else:
            unsupported = {
                "dilation": (layer.dilation, all(d == 1 for d in layer.dilation)),
                "groups": (layer.groups, layer.groups == 1),
                "padding_mode": (layer.padding_mode, layer.padding_mode == "zeros"),
            }
            for name, (value, ok) in unsupported.items():
                if not ok:
                    raise NotImplementedError(
                        f"TrAct supports convolutions with dilation 1, groups 1 and padding_mode 'zeros' (as the "
                        f"paper's first layers); got {name}={value!r}"
                    )
            geometry = _conv_geometry(layer.weight.dim() - 2, layer.kernel_size, layer.stride, layer.padding)
            self.stride, self.padding = geometry.stride, geometry.padding
        self.weight = layer.weight  # the layer's own Parameters: optimizers and state_dict keys see no change
        self.register_parameter("bias", layer.bias)
        self.lam = lam
        self.__dict__["_layer"] = layer  # kept for unwrap(), but not a submodule (its parameters are ours)

    @property
    def lam(self) -> float:
        """λ, the regularisation of the activation-space least-squares problem (> 0; settable)."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        check_hyperparameters(HYPERPARAMETERS, {"lam": value})
        self._lam = float(value)

    def forward(self, input: Tensor) -> Tensor:
        return tract(input, self.weight, self.bias, lam=self._lam, stride=self.stride, padding=self.padding)

    def unwrap(self) -> nn.Linear | nn.Conv1d | nn.Conv2d:
        """The plain layer, holding this module's current ``weight`` and ``bias``."""
        layer = self.__dict__["_layer"]
        layer.weight, layer.bias = self.weight, self.bias
        return layer

    @classmethod
    def wrap(cls, model: nn.Module, name: str, lam: float = 0.1) -> TrAct:
        """Replace the submodule ``name`` of ``model`` (dotted, e.g. ``"conv1"``, ``"patch_embed.proj"``, ``"0"``
        in an ``nn.Sequential``) by ``TrAct(submodule, lam)``, in place, and return the wrapper."""
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapper = cls(model.get_submodule(name), lam)
        setattr(parent, child, wrapper)
        return wrapper

    def extra_repr(self) -> str:
        layer = self.__dict__["_layer"]
        return f"{type(layer).__name__}({layer.extra_repr()}), lam={self._lam:g}"


register(
    MethodInfo(
        name="tract",
        cls=TrAct,
        kind="layer",
        paper="TrAct: Making First-layer Pre-Activations Trainable",
        arxiv="2410.23970",
        code_url="https://github.com/Felix-Petersen/tract",
        summary="first-layer weight gradient replaced by the closed-form weight change that best realises a "
        "gradient step on the pre-activations",
        hyperparameters=HYPERPARAMETERS,
        advice="Wrap only the first layer (model.conv1 = TrAct(model.conv1)); keep the optimizer and its settings.",
        usage="""import optimlab

model.conv1 = optimlab.TrAct(model.conv1, lam=0.1)  # wrap the first layer; any optimizer, unchanged
# or, by its name in the model
optimlab.TrAct.wrap(model, "conv1")
""",
    )
)
