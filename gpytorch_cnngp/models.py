"""ExactGP models that suit expensive kernels such as :class:`~gpytorch_cnngp.CNNGPKernel`."""

from __future__ import annotations

import torch
from gpytorch import settings
from gpytorch.distributions import MultivariateNormal
from gpytorch.models import ExactGP
from linear_operator import to_linear_operator

__all__ = ["SharedCovarianceExactGP"]


class SharedCovarianceExactGP(ExactGP):
    r"""An ``ExactGP`` for ``C`` independent outputs that share one kernel and one noise.

    Subclass it exactly like :class:`gpytorch.models.ExactGP` (define ``mean_module``,
    ``covar_module`` and ``forward``) with a non-batch mean, kernel and ``GaussianLikelihood``, and
    pass ``train_targets`` of shape ``(C, n)`` (or ``(n,)`` for one output). Each training step then
    evaluates the kernel once and factorises :math:`K_{xx} + \sigma^2 I` once for all outputs; the
    marginal log likelihood has shape ``(C,)``, so train on ``-mll(model(x), y).sum()``.

    In prediction the predictive mean is :math:`K_{*x}(K_{xx} + \sigma^2 I)^{-1} Y` for every
    output (shape ``(C, m)``) with one shared covariance over the ``m`` test points. Compared with a
    plain ``ExactGP`` it never builds the ``m x m`` test covariance unless it is asked for
    (``.mean`` and ``.variance`` only need its diagonal), and it reuses :math:`K_{xx}` for as long
    as the hyperparameters are unchanged.

    Example:
        >>> class Model(SharedCovarianceExactGP):
        ...     def __init__(self, x, y, likelihood, kernel):
        ...         super().__init__(x, y, likelihood)
        ...         self.mean_module = gpytorch.means.ZeroMean()
        ...         self.covar_module = kernel
        ...     def forward(self, x):
        ...         return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))
    """

    def __call__(self, *args, **kwargs):
        if self.training or settings.prior_mode.on():
            return super().__call__(*args, **kwargs)
        # Keep test covariances lazy even for small problems (GPyTorch densifies below 512 points).
        with settings.max_eager_kernel_size(0):
            out = super().__call__(*args, **kwargs)
        return self._independent_outputs(out)

    @staticmethod
    def _independent_outputs(out):
        """The posterior with its shared covariance expanded (lazily) over the outputs' batch.

        The prediction has one mean per output but one covariance for all of them; a distribution built from
        that broadcasts a single draw to every output (identical samples) and cannot draw sample shapes.
        Expanding the covariance's batch makes the outputs independent, as the model says they are.
        """
        if not isinstance(out, MultivariateNormal):
            return out
        batch = out.mean.shape[:-1]
        covar = out.lazy_covariance_matrix
        if not batch or covar.shape[:-2] == batch:
            return out
        n = out.mean.shape[-1]
        return out.__class__(out.mean, covar.expand(*batch, n, n))

    def _get_train_prior_distribution(self, train_inputs, **kwargs) -> MultivariateNormal:
        prior = self.forward(*train_inputs, **kwargs)
        with torch.no_grad():
            covar = prior.lazy_covariance_matrix
            covar = covar.evaluate_kernel() if hasattr(covar, "evaluate_kernel") else covar
        return MultivariateNormal(prior.mean, to_linear_operator(covar.to_dense()))

    def _get_test_prior_mean_and_covariances(self, train_inputs, test_inputs, **kwargs):
        (x_train,) = train_inputs
        (x_test,) = test_inputs
        prior = self.forward(x_test, **kwargs)
        # K(test, test) stays lazy: the prediction strategy only takes its diagonal for variances.
        test_test = prior.lazy_covariance_matrix
        test_train = self.covar_module(x_test, x_train)
        test_train = test_train.evaluate_kernel() if hasattr(test_train, "evaluate_kernel") else test_train
        targets = self.train_targets
        batch = targets.shape[:-1]
        mean = prior.mean.expand(*batch, x_test.shape[-2])
        return mean, test_test, test_train, batch, torch.Size([x_test.shape[-2]]), MultivariateNormal
