"""CNNGPKernel: any architecture of this package as a GPyTorch kernel with learnable variances."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from gpytorch.constraints import Interval, Positive
from gpytorch.kernels import Kernel, ScaleKernel
from gpytorch.priors import LogNormalPrior, Prior
from linear_operator import to_linear_operator
from linear_operator.operators import LinearOperator
from torch import Tensor

from .backends import resolve
from .engine import check_architecture, gram, gram_diag
from .layers.base import Layer
from .state import Hyper, hyperparameters

__all__ = ["CNNGPKernel"]

_NO_LAST_DIM_IS_BATCH = (
    "CNNGPKernel does not support last_dim_is_batch=True (it would split the image pixels); call it without it"
)


class CNNGPKernel(Kernel):
    r"""The exact kernel of an infinitely wide CNN, as a GPyTorch kernel.

    For an architecture of :class:`~gpytorch_cnngp.Conv2d`, :class:`~gpytorch_cnngp.ReLU`,
    :class:`~gpytorch_cnngp.Sum`, :class:`~gpytorch_cnngp.AvgPool2d`, ... layers, :math:`k(x, x')`
    is the covariance of the network's output over random weights in the infinite-width limit
    (Garriga-Alonso et al., 2019). Each weighted layer's (:class:`~gpytorch_cnngp.Conv2d`,
    :class:`~gpytorch_cnngp.Dense`) weight and bias variances become GPyTorch hyperparameters:

    * ``tied=True`` (default): one ``var_weight`` and one ``var_bias`` shared by all layers; every
      layer keeps the ratio its value has to the readout's (the last weighted layer's) in
      ``architecture``. With the paper's configs (hidden ``sigma_w^2 k^2``, readout ``sigma_w^2``)
      the learned ``var_weight`` is exactly the paper's :math:`\sigma_w^2`.
    * ``tied=False``: one value per weighted layer, in :func:`~gpytorch_cnngp.state.hyperparameters`
      order (see :meth:`layer_variances`).

    A bias variance that is exactly zero in ``architecture`` stays zero unless ``free_zero_biases``.

    .. note::
        The variances set the kernel's shape *and* its overall scale (the ConvNet GP's values are
        about 1e12 at the paper's values). For marginal-likelihood training (GPyTorch, BoTorch's
        ``fit_gpytorch_mll``) use :meth:`recommended`: the kernel normalised to a correlation
        (``normalize=True``) inside a :class:`gpytorch.kernels.ScaleKernel` that alone owns the scale,
        with the variances in log space under priors at the architecture's values. A ``ScaleKernel``
        around the un-normalised kernel shares the scale between ``outputscale`` and the variances,
        and ML-II drifts along that ridge to values that mean nothing.

    Inputs follow GPyTorch's convention ``(..., n, d)`` with ``d = C * H * W`` (images flattened in
    C, H, W order); they are reshaped to ``input_shape`` inside. ``active_dims`` and
    ``last_dim_is_batch`` are refused (when the kernel is made or called): they select flat pixels, which breaks
    the image.

    Gradients of any loss with respect to the variances are exact; the backward pass recomputes
    one tile of pairs at a time, so memory stays bounded by the tile size. Without gradients, the
    three most recent results are reused while their inputs, hyperparameters and settings (``get``,
    ``normalize``, ``backend``, tiles, dtype, device) are unchanged (:attr:`num_evaluations` counts the real
    computations; :meth:`clear_cache` frees them).

    :param architecture: a :class:`~gpytorch_cnngp.Layer` whose output is 1x1 for ``input_shape``.
    :param input_shape: ``(C, H, W)`` of one image.
    :param tied: share one weight and one bias variance across layers (see above).
    :param free_zero_biases: also learn biases that are zero in the architecture (they start at
        ``zero_bias_init``).
    :param var_weight_prior, var_bias_prior: optional priors on the (tied or per-layer) variances.
    :param var_weight_constraint, var_bias_constraint: default :class:`~gpytorch.constraints.Positive`.
    :param tile_size, memory_budget, backend: passed to :func:`~gpytorch_cnngp.gram` (``backend``:
        ``"auto"``, ``"eager"``, ``"inductor"`` or ``"native"``; the variances' gradients run natively where the
        native kernel runs the network, else eagerly).
    :param get: ``"nngp"`` (default: the CNN-GP kernel) or ``"ntk"``: the neural tangent kernel of the same
        network in the NTK parameterisation, whose variances are learned the same way.
    :param normalize: return the correlation :math:`k(x, z) / \sqrt{k(x, x) k(z, z)}` (ones on the diagonal)
        instead of :math:`k(x, z)`; an image with zero variance (blank, in a network without biases) is an error.

    Example:
        >>> import gpytorch
        >>> from gpytorch_cnngp import CNNGPKernel, architectures
        >>> kernel = CNNGPKernel(architectures.convnet_gp(image_size=8), input_shape=(1, 8, 8))
        >>> x = torch.rand(6, 64, dtype=torch.float64)
        >>> kernel = kernel.double()
        >>> kernel(x).to_dense().shape
        torch.Size([6, 6])
        >>> float(kernel.var_weight), float(kernel.var_bias)  # the paper's sigma_w^2, sigma_b^2
        (2.79..., 7.86...)
    """

    has_lengthscale = False

    def __init__(
        self,
        architecture: Layer,
        input_shape: Sequence[int],
        *,
        tied: bool = True,
        free_zero_biases: bool = False,
        zero_bias_init: float = 1e-3,
        var_weight_prior: Prior | None = None,
        var_bias_prior: Prior | None = None,
        var_weight_constraint: Interval | None = None,
        var_bias_constraint: Interval | None = None,
        tile_size: int | None = None,
        memory_budget: int | None = None,
        backend: str = "auto",
        get: str = "nngp",
        normalize: bool = False,
        **kwargs,
    ):
        if kwargs.get("active_dims") is not None:
            raise ValueError("CNNGPKernel does not support active_dims: it would select flat pixels of the images")
        if kwargs.pop("last_dim_is_batch", False):
            raise ValueError(_NO_LAST_DIM_IS_BATCH)
        if "compile" in kwargs:
            # gpytorch's Kernel accepts any keyword: refuse this one as Python does, not silently
            raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument 'compile'")
        super().__init__(**kwargs)
        if not isinstance(architecture, Layer):
            raise ValueError(f"architecture must be a gpytorch_cnngp layer, got {type(architecture).__name__}")
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape}")
        check_architecture(architecture, input_shape[1:])
        # A private copy: the kernel owns its hyperparameters, the user's object is left alone.
        self.architecture = copy.deepcopy(architecture)
        self.input_shape = input_shape
        self.tied = bool(tied)
        self.tile_size, self.memory_budget = tile_size, memory_budget
        self.backend = resolve(backend)
        if get not in ("nngp", "ntk"):
            raise ValueError(f"get must be 'nngp' or 'ntk', got {get!r}")
        self.get = get
        self.normalize = bool(normalize)
        self.num_evaluations = 0
        self._exact_values: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (value set, float64; raw after)
        self._cache: list[tuple] = []  # recent (settings, x1, x2, diag, values, result), newest last

        convs = self._weight_layers()
        if not convs:
            raise ValueError("the architecture has no layer with a weight variance to learn")
        init_w = [float(layer.var_weight) for layer in convs]
        init_b = [float(layer.var_bias) for layer in convs]
        learn_b = [b > 0 or free_zero_biases for b in init_b]
        init_b = [b if b > 0 else (zero_bias_init if free else 0.0) for b, free in zip(init_b, learn_b, strict=True)]
        self._learn_bias = tuple(learn_b)
        if self.tied:
            ref_w = init_w[-1] if init_w[-1] > 0 else next((w for w in reversed(init_w) if w > 0), 0.0)
            if ref_w <= 0:
                raise ValueError("tied=True needs at least one non-zero var_weight in the architecture")
            learned_b = [b for b, free in zip(init_b, learn_b, strict=True) if free]
            ref_b = init_b[-1] if learn_b[-1] else (learned_b[-1] if learned_b else 0.0)
            self._weight_ratio = tuple(w / ref_w for w in init_w)
            self._bias_ratio = tuple(b / ref_b if free else 0.0 for b, free in zip(init_b, learn_b, strict=True))
            w0, b0 = [ref_w], ([ref_b] if learned_b else [])
        else:
            self._weight_ratio = self._bias_ratio = None
            w0, b0 = init_w, [b for b, free in zip(init_b, learn_b, strict=True) if free]
        self._n_bias = len(b0)

        self.register_parameter("raw_var_weight", torch.nn.Parameter(torch.zeros(*self.batch_shape, len(w0))))
        self.register_constraint("raw_var_weight", var_weight_constraint or Positive())
        if var_weight_prior is not None:
            if not isinstance(var_weight_prior, Prior):
                raise TypeError(f"var_weight_prior must be a gpytorch Prior, got {type(var_weight_prior).__name__}")
            self.register_prior("var_weight_prior", var_weight_prior, self._var_weight_param, self._var_weight_closure)
        self.var_weight = torch.tensor(w0, dtype=torch.float64)
        if self._n_bias:
            self.register_parameter("raw_var_bias", torch.nn.Parameter(torch.zeros(*self.batch_shape, len(b0))))
            self.register_constraint("raw_var_bias", var_bias_constraint or Positive())
            if var_bias_prior is not None:
                if not isinstance(var_bias_prior, Prior):
                    raise TypeError(f"var_bias_prior must be a gpytorch Prior, got {type(var_bias_prior).__name__}")
                self.register_prior("var_bias_prior", var_bias_prior, self._var_bias_param, self._var_bias_closure)
            self.var_bias = torch.tensor(b0, dtype=torch.float64)
        elif var_bias_prior is not None:
            raise ValueError("var_bias_prior given, but no bias variance is learned (see free_zero_biases)")

    @classmethod
    def recommended(
        cls,
        architecture: Layer,
        input_shape: Sequence[int],
        *,
        prior_width: float = 1.0,
        **kwargs,
    ) -> ScaleKernel:
        r"""The kernel to give a ``SingleTaskGP`` (or any ExactGP fitted by ML-II) as its ``covar_module``.

        The un-normalised kernel's overall scale grows like a product of the layers' ``var_weight``, so an
        outer ``ScaleKernel``'s ``outputscale`` and the variances share one degree of freedom: the marginal
        likelihood has a ridge along which the fit drifts to values that mean nothing. Here the network
        kernel is normalised to a correlation,

        .. math:: \tilde k(x, z) = k(x, z) / \sqrt{k(x, x)\, k(z, z)},

        so the variances set only its shape and ``outputscale`` alone owns the scale. The variances are
        optimised in log space (an ``exp`` transform) under log-normal priors whose modes are the
        architecture's own values (the paper's, for :mod:`gpytorch_cnngp.architectures`) and whose log
        standard deviation is ``prior_width``; ``outputscale`` gets a ``LogNormalPrior(0, 1)``, which suits
        standardised targets (BoTorch's default ``Standardize``).

        :param architecture, input_shape: as for :class:`CNNGPKernel`.
        :param prior_width: standard deviation of the priors on the logarithms of the variances (a factor
            :math:`e^{\text{width}}` either side of the architecture's values is one standard deviation).
        :param kwargs: further :class:`CNNGPKernel` arguments (``tied``, ``backend``, ``get``, ...).
        :return: ``ScaleKernel(CNNGPKernel(..., normalize=True))``; the network kernel is its ``base_kernel``.

        Example:
            >>> from botorch.fit import fit_gpytorch_mll
            >>> from botorch.models import SingleTaskGP
            >>> from gpytorch.mlls import ExactMarginalLogLikelihood
            >>> from gpytorch_cnngp import CNNGPKernel, architectures
            >>> covar = CNNGPKernel.recommended(architectures.convnet_gp(image_size=14), input_shape=(1, 14, 14))
            >>> # train_x: (n, 196) float64, flat 14x14 images; train_y: (n, 1)
            >>> model = SingleTaskGP(train_x, train_y, covar_module=covar)  # doctest: +SKIP
            >>> fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))  # doctest: +SKIP
            >>> covar.base_kernel.var_weight, covar.base_kernel.var_bias, covar.outputscale  # doctest: +SKIP
        """
        if not prior_width > 0 or not torch.isfinite(torch.tensor(float(prior_width))):
            raise ValueError(f"prior_width must be a positive number, got {prior_width!r}")
        for name in ("normalize", "var_weight_prior", "var_bias_prior", "var_weight_constraint", "var_bias_constraint"):
            if name in kwargs:
                raise ValueError(f"recommended() sets {name} itself; build CNNGPKernel(...) directly to choose it")
        log_space = {"transform": torch.exp, "inv_transform": torch.log}
        kernel = cls(
            architecture,
            input_shape,
            normalize=True,
            var_weight_constraint=Positive(**log_space),
            var_bias_constraint=Positive(**log_space),
            **kwargs,
        )

        def mode_at(value: Tensor) -> LogNormalPrior:
            # a log-normal's mode is exp(loc - width^2): put it at the architecture's value
            loc = value.log() + prior_width**2
            return LogNormalPrior(loc.to(kernel.raw_var_weight.dtype), prior_width)

        weight_prior = mode_at(kernel._exact_values["var_weight"][0])
        kernel.register_prior("var_weight_prior", weight_prior, kernel._var_weight_param, kernel._var_weight_closure)
        if kernel._n_bias:
            bias_prior = mode_at(kernel._exact_values["var_bias"][0])
            kernel.register_prior("var_bias_prior", bias_prior, kernel._var_bias_param, kernel._var_bias_closure)
        return ScaleKernel(kernel, outputscale_prior=LogNormalPrior(0.0, 1.0))

    # --- hyperparameters ---------------------------------------------------------------------
    def _weight_layers(self) -> list[Layer]:
        return [layer for layer, name in hyperparameters(self.architecture) if name == "var_weight"]

    @property
    def var_weight(self) -> Tensor:
        """Weight variance(s): shape ``(*batch_shape, 1)`` when tied, else ``(*batch_shape, n_layers)``."""
        return self.raw_var_weight_constraint.transform(self.raw_var_weight)

    @var_weight.setter
    def var_weight(self, value: float | Tensor) -> None:
        self._set_var_weight(value)

    def _set_var_weight(self, value: float | Tensor) -> None:
        self._set_exact("var_weight", value)

    def _set_exact(self, name: str, value: float | Tensor) -> None:
        """Set ``raw_<name>`` from ``value``, remembering ``value`` in float64 (see :meth:`_apply`)."""
        raw = getattr(self, f"raw_{name}")
        exact = torch.as_tensor(value, dtype=torch.float64).detach().clone()
        value = torch.as_tensor(value, dtype=raw.dtype, device=raw.device)
        self.initialize(**{f"raw_{name}": getattr(self, f"raw_{name}_constraint").inverse_transform(value)})
        self._exact_values[name] = (exact, getattr(self, f"raw_{name}").detach().clone())

    def _apply(self, fn, *args, **kwargs):
        """``.double()``, ``.to(torch.float64)``, ...: a hyperparameter unchanged since it was last set keeps the
        value it was set to, not its float32 rounding (``raw`` parameters are created in the default dtype)."""
        out = super()._apply(fn, *args, **kwargs)
        for name, (exact, raw_then) in list(getattr(self, "_exact_values", {}).items()):
            raw = getattr(self, f"raw_{name}")
            if raw.dtype == raw_then.dtype or raw.shape != raw_then.shape or not raw.dtype.is_floating_point:
                continue
            # unchanged since it was set: equal once both are in the narrower of the two dtypes
            narrower = min(raw.dtype, raw_then.dtype, key=lambda d: d.itemsize)
            unchanged = torch.equal(raw.detach().cpu().to(narrower), raw_then.cpu().to(narrower))
            if not unchanged:
                del self._exact_values[name]
                continue
            if raw.dtype.itemsize > raw_then.dtype.itemsize:  # widened: back to the value that was set
                with torch.no_grad():
                    value = exact.to(device=raw.device, dtype=raw.dtype)
                    raw.copy_(getattr(self, f"raw_{name}_constraint").inverse_transform(value))
            self._exact_values[name] = (exact, raw.detach().clone())
        return out

    def _var_weight_param(self, module: CNNGPKernel) -> Tensor:
        return module.var_weight

    def _var_weight_closure(self, module: CNNGPKernel, value: Tensor) -> None:
        module._set_var_weight(value)

    @property
    def var_bias(self) -> Tensor:
        """Bias variance(s) that are learned (empty when every bias is fixed at zero)."""
        if not self._n_bias:
            return torch.zeros(*self.batch_shape, 0, dtype=self.raw_var_weight.dtype, device=self.raw_var_weight.device)
        return self.raw_var_bias_constraint.transform(self.raw_var_bias)

    @var_bias.setter
    def var_bias(self, value: float | Tensor) -> None:
        self._set_var_bias(value)

    def _set_var_bias(self, value: float | Tensor) -> None:
        if not self._n_bias:
            raise ValueError("this kernel learns no bias variance (all are zero; see free_zero_biases)")
        self._set_exact("var_bias", value)

    def _var_bias_param(self, module: CNNGPKernel) -> Tensor:
        return module.var_bias

    def _var_bias_closure(self, module: CNNGPKernel, value: Tensor) -> None:
        module._set_var_bias(value)

    def _layer_values(self) -> tuple[Tensor, Tensor]:
        """Effective per-layer variances, each ``(*batch_shape, n_layers)``."""
        w = self.var_weight
        if self.tied:
            ratio = torch.tensor(self._weight_ratio, dtype=w.dtype, device=w.device)
            weights = w * ratio
        else:
            weights = w
        n = weights.shape[-1]
        if not self._n_bias:
            return weights, torch.zeros_like(weights)
        b = self.var_bias
        if self.tied:
            biases = b * torch.tensor(self._bias_ratio, dtype=b.dtype, device=b.device)
        else:
            index = torch.tensor([i for i in range(n) if self._learn_bias[i]], device=b.device)
            biases = torch.zeros(*b.shape[:-1], n, dtype=b.dtype, device=b.device).index_copy(-1, index, b)
        return weights, biases

    def layer_variances(self) -> list[dict]:
        """The effective variances of every convolution (first batch element), for reading."""
        with torch.no_grad():
            weights, biases = self._layer_values()
        weights = weights.reshape(-1, weights.shape[-1])[0]
        biases = biases.reshape(-1, biases.shape[-1])[0]
        return [
            {"layer": repr(layer), "var_weight": float(w), "var_bias": float(b)}
            for layer, w, b in zip(self._weight_layers(), weights, biases, strict=True)
        ]

    # --- kernel evaluation -------------------------------------------------------------------
    def _images(self, x: Tensor, name: str) -> Tensor:
        c, h, w = self.input_shape
        if x.shape[-1] != c * h * w:
            raise ValueError(
                f"{name} has {x.shape[-1]} features per point, but input_shape {self.input_shape} needs "
                f"C*H*W = {c * h * w} (flatten each image in C, H, W order)"
            )
        return x.reshape(*x.shape[:-1], c, h, w)

    _CACHE_ENTRIES = 3

    @staticmethod
    def _squeeze_batch(x: Tensor) -> Tensor:
        # (1, n, d) and (n, d) hold the same points (GPyTorch adds singleton batch dimensions)
        while x.dim() > 2 and x.shape[0] == 1:
            x = x[0]
        return x

    def _settings_key(self, values: Tensor) -> tuple:
        """Everything besides the inputs and the variances' values that changes the result."""
        return (
            self.get,
            self.normalize,
            self.backend,
            self.tile_size,
            self.memory_budget,
            values.dtype,
            values.device,
            values.shape,
        )

    def _lookup(self, x1: Tensor, x2: Tensor, diag: bool, values: Tensor) -> Tensor | None:
        x1, x2 = self._squeeze_batch(x1), self._squeeze_batch(x2)
        key = self._settings_key(values)
        for c_key, c1, c2, c_diag, c_values, result in reversed(self._cache):
            if (
                c_key == key
                and c_diag == diag
                and c1.shape == x1.shape
                and c2.shape == x2.shape
                and c1.dtype == x1.dtype
                and c2.dtype == x2.dtype
                and c1.device == x1.device
                and c2.device == x2.device
                and torch.equal(c_values, values.detach())
                and torch.equal(c1, x1.detach())
                and (c2 is c1 and x2 is x1 or torch.equal(c2, x2.detach()))
            ):
                return result
        return None

    def _remember(self, x1: Tensor, x2: Tensor, diag: bool, values: Tensor, result: Tensor) -> None:
        same = x1 is x2
        x1, x2 = self._squeeze_batch(x1).detach().clone(), self._squeeze_batch(x2).detach()
        x2 = x1 if same else x2.clone()
        key = self._settings_key(values)
        self._cache.append((key, x1, x2, diag, values.detach().clone(), result.detach()))
        del self._cache[: -self._CACHE_ENTRIES]

    def named_sub_kernels(self) -> Iterator[tuple[str, Kernel]]:
        """None: the architecture's layers are modules but not GPyTorch kernels. (GPyTorch's default walks every
        submodule to find them, several times per call: about 0.3 ms for a ResNet-32 GP.)"""
        return iter(())

    def clear_cache(self) -> None:
        """Forget remembered kernel matrices (they are also dropped on pickling)."""
        self._cache = []

    def __call__(
        self, x1: Tensor, x2: Tensor | None = None, diag: bool = False, last_dim_is_batch: bool = False, **params
    ):
        # refused here, not when a lazy result is evaluated (possibly far from the call that asked for it)
        if last_dim_is_batch:
            raise ValueError(_NO_LAST_DIM_IS_BATCH)
        return super().__call__(x1, x2, diag=diag, **params)

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if last_dim_is_batch:
            raise ValueError(_NO_LAST_DIM_IS_BATCH)
        weights, biases = self._layer_values()
        values = torch.stack([weights, biases], dim=-1)  # (*batch_shape, n_layers, 2)
        # the kernel computes in its own dtype (a float64 model stays float64 whatever the inputs)
        x1, x2 = (x if x.dtype == values.dtype else x.to(values.dtype) for x in (x1, x2))
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], values.shape[:-2])
        shape = (*batch, x1.shape[-2]) if diag else (*batch, x1.shape[-2], x2.shape[-2])
        if x1.shape[-2] == 0 or (not diag and x2.shape[-2] == 0):
            empty = values.new_zeros(shape)
            if torch.is_grad_enabled():
                # tied to everything it depends on, so that a loss over it back-propagates (zero gradients), as
                # GPyTorch's own kernels do
                empty = empty + 0.0 * (values.sum() + x1.sum() + x2.sum())
            return empty if diag else to_linear_operator(empty)
        # the cache never changes what autograd sees: a call that needs a graph (hyperparameters or inputs that
        # require grad) computes afresh, and results with a graph to the inputs are not kept
        input_grad = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad)
        needs_grad = input_grad or (torch.is_grad_enabled() and values.requires_grad)
        result = None if needs_grad else self._lookup(x1, x2, diag, values)
        if result is None:
            result = self._evaluate(x1, x2, diag, values)
            self.num_evaluations += 1
            if not input_grad:
                self._remember(x1, x2, diag, values, result)
        elif result.shape != shape:
            result = result.reshape(shape)
        return result if diag else to_linear_operator(result)

    def _evaluate(self, x1: Tensor, x2: Tensor, diag: bool, values: Tensor) -> Tensor:
        same = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        im1, im2 = self._images(x1, "x1"), self._images(x2, "x2")
        batch = torch.broadcast_shapes(im1.shape[:-4], im2.shape[:-4], values.shape[:-2])
        repeated = self._repeated(im1), self._repeated(im2)
        im1 = im1.expand(*batch, *im1.shape[-4:]).reshape(-1, *im1.shape[-4:])
        im2 = im2.expand(*batch, *im2.shape[-4:]).reshape(-1, *im2.shape[-4:])
        vals = values.expand(*batch, *values.shape[-2:]).reshape(-1, *values.shape[-2:])
        if im1.shape[0] > 1 and values.shape[:-2].numel() == 1:
            shared = self._evaluate_shared(im1, im2, diag, same, repeated, self._hyper(vals[0]))
            if shared is not None:
                return shared.reshape(*batch, *shared.shape[1:])
        outs = []
        for b in range(im1.shape[0]):
            outs.append(self._evaluate_one(im1[b], None if same else im2[b], diag, self._hyper(vals[b])))
        out = torch.stack(outs) if outs else values.new_zeros(0)
        return out.reshape(*batch, *out.shape[1:])

    def _hyper(self, vals: Tensor) -> Hyper:
        """One Hyper from here to the layers: the learned values ``(n_layers, 2)`` of one batch entry."""
        override = {
            layer: {"var_weight": vals[i, 0], "var_bias": vals[i, 1]} for i, layer in enumerate(self._weight_layers())
        }
        return Hyper.of(self.architecture, override=override)

    def _evaluate_one(self, x: Tensor, z: Tensor | None, diag: bool, hyper: Hyper) -> Tensor:
        """The kernel (normalised if asked) of images ``x`` ``[n, C, H, W]`` and ``z`` (``None``: ``x``)."""
        if diag:
            out = gram_diag(self.architecture, x, z, hyper=hyper, get=self.get)
        else:
            out = gram(
                self.architecture,
                x,
                z,
                hyper=hyper,
                tile_size=self.tile_size,
                memory_budget=self.memory_budget,
                backend=self.backend,
                get=self.get,
            )
        return self._normalized(out, x, z, diag, hyper) if self.normalize else out

    def _evaluate_shared(
        self, im1: Tensor, im2: Tensor, diag: bool, same: bool, repeated: tuple[bool, bool], hyper: Hyper
    ) -> Tensor | None:
        """A batch ``[B, n, C, H, W]`` of kernels with one set of variances, in one call where that is exact.

        BoTorch's analytic acquisition functions ask for ``K(candidates, train)`` with ``B`` candidates of one point
        each and the training images repeated ``B`` times: one ``B x n`` kernel instead of ``B`` kernels of one row,
        each of which would redo the training images' self terms. ``repeated``: whether each side holds the same
        images in every batch entry. ``None`` where no such shortcut applies.
        """
        batch, m = im1.shape[0], im1.shape[1]
        flat1 = im1.reshape(-1, *im1.shape[2:])
        if repeated[0] and (same or repeated[1]):
            out = self._evaluate_one(im1[0], None if same else im2[0], diag, hyper)
            return out.expand(batch, *out.shape)
        if diag:  # entry by entry: any batch of pairs is one list of pairs
            out = self._evaluate_one(flat1, None if same else im2.reshape(-1, *im2.shape[2:]), True, hyper)
            return out.reshape(batch, m)
        if same:
            return None
        if repeated[1]:
            return self._evaluate_one(flat1, im2[0], False, hyper).reshape(batch, m, -1)
        if repeated[0]:
            out = self._evaluate_one(im1[0], im2.reshape(-1, *im2.shape[2:]), False, hyper)
            return out.reshape(m, batch, -1).transpose(0, 1)
        return None

    @staticmethod
    def _repeated(images: Tensor) -> bool:
        """Whether every batch entry of ``images`` ``[..., n, C, H, W]`` holds the same images: a broadcast or
        expanded tensor, or (when no gradient must reach each entry separately) equal entries."""
        lead = images.shape[:-4]
        if lead.numel() <= 1 or all(
            stride == 0 for size, stride in zip(lead, images.stride()[: len(lead)], strict=True) if size > 1
        ):
            return True
        if torch.is_grad_enabled() and images.requires_grad:
            return False
        flat = images.reshape(-1, *images.shape[-4:])
        return torch.equal(flat, flat[:1].expand_as(flat))

    def _normalized(self, out: Tensor, x: Tensor, z: Tensor | None, diag: bool, hyper: Hyper) -> Tensor:
        """``out`` (``K(x, z)`` or its diagonal) divided by the square roots of the variances of both sides."""
        if z is None:
            var_x = out if diag else out.diagonal()
            var_z = var_x
        else:
            var_x = gram_diag(self.architecture, x, hyper=hyper, get=self.get)
            var_z = gram_diag(self.architecture, z, hyper=hyper, get=self.get)
        for name, var in (("x1", var_x), ("x2", var_z)):
            if bool((var <= 0).any()):
                i = int((var <= 0).nonzero()[0, 0])
                raise ValueError(
                    f"{name}[{i}] has zero variance under this network (a blank image and no bias variance), so "
                    "its correlation with other images is undefined: use normalize=False, or give the network a "
                    "bias variance"
                )
        if diag:
            return out / (var_x * var_z).sqrt()
        return out / (var_x.sqrt()[:, None] * var_z.sqrt()[None, :])

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        return 1

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = []
        return state

    def evaluate_dense(self, x1: Tensor, x2: Tensor | None = None) -> Tensor:
        """Convenience: the dense kernel matrix as a tensor."""
        out = self(x1, x2)
        return out.to_dense() if isinstance(out, LinearOperator) else out
