import gpytorch
import torch

from gpytorch_cnngp import CNNGPKernel, SharedCovarianceExactGP, architectures
from gpytorch_cnngp.datasets import load_split

data = load_split("mnist", n_train=256, n_val=0, n_test=200)  # MNIST downloads and verifies itself on first use
(X, y), (X_test, y_test) = data["train"], data["test"]
X, X_test = X.flatten(1), X_test.flatten(1)  # GPyTorch wants (n, d): flat 1x28x28 images
Y = 2.0 * torch.nn.functional.one_hot(y, 10).T.double() - 1.0  # (10, n): +1 at the class, -1 elsewhere


class ConvNetGP(SharedCovarianceExactGP):  # an ExactGP whose 10 outputs share one kernel (one Cholesky)
    def __init__(self, x, targets, likelihood):
        super().__init__(x, targets, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        cnn = CNNGPKernel(architectures.convnet_gp(), input_shape=(1, 28, 28))  # learns var_weight and var_bias
        self.covar_module = gpytorch.kernels.ScaleKernel(cnn)  # the CNN-GP's values are ~1e12: learn a scale

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-6))
model = ConvNetGP(X, Y, likelihood).double()
with torch.no_grad():
    model.covar_module.outputscale = 1 / model.covar_module.base_kernel(X, diag=True).mean()  # unit prior variance
likelihood.noise = 1e-3
mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
model.train()
with gpytorch.settings.max_cholesky_size(10**6):  # exact Cholesky, no conjugate gradients
    for step in range(3):
        optimizer.zero_grad()
        loss = -mll(model(X), Y).sum()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.3f}, var_weight {model.covar_module.base_kernel.var_weight.item():.3f}")
    model.eval()
    with torch.no_grad():
        predictions = model(X_test).mean.argmax(0)  # predictive means: (10, n_test)
print(f"test error: {(predictions != y_test).double().mean().item():.3f}")
