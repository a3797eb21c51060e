"""A straightforward CBN written for clarity, not speed: autograd computes the weight
derivatives and explicit weight snapshots are kept. The tests check the layer against it."""
import torch


class ReferenceCBN:
    """CBN on ``conv(x)``; ``gamma``/``beta`` are given by the caller so both sides share them."""

    def __init__(self, num_features, window, burnin=0, compensate=True, eps=1e-5, momentum=0.1):
        self.window, self.burnin, self.compensate = window, burnin, compensate
        self.eps, self.momentum = eps, momentum
        self.history = []  # newest first: (mu, nu, dmu/dW, dnu/dW, W snapshot)
        self.step = 0
        self.tracked = 0  # batches seen by the running statistics (momentum=None: their mean)
        self.running_mean = torch.zeros(num_features, dtype=torch.float64)
        self.running_var = torch.ones(num_features, dtype=torch.float64)

    def __call__(self, conv, x, gamma, beta):
        y = conv(x)
        w = conv.weight
        mu = y.mean((0, 2, 3))
        nu = (y * y).mean((0, 2, 3))
        m = y.numel() // y.shape[1]
        use_window = self.window > 1 and self.step >= self.burnin
        self.step += 1
        if not use_window:
            mean, var, count = mu, nu - mu * mu, m
        else:
            dmu = torch.autograd.grad(mu.sum(), w, retain_graph=True)[0]
            dnu = torch.autograd.grad(nu.sum(), w, retain_graph=True)[0]
            mus, nus = [mu], [nu]
            for mu_s, nu_s, dmu_s, dnu_s, w_s in self.history:
                delta = (w.detach() - w_s) if self.compensate else torch.zeros_like(w_s)
                mu_hat = mu_s + (dmu_s * delta).sum((1, 2, 3))
                nu_hat = nu_s + (dnu_s * delta).sum((1, 2, 3))
                mus.append(mu_hat)
                nus.append(torch.maximum(nu_hat, mu_hat * mu_hat))
            n = len(mus)
            mean = sum(mus) / n
            var = sum(nus) / n - mean * mean
            count = n * m
            self.history.insert(0, (mu.detach(), nu.detach(), dmu, dnu, w.detach().clone()))
            del self.history[self.window - 1:]
        with torch.no_grad():
            self.tracked += 1
            f = self.momentum if self.momentum is not None else 1.0 / self.tracked
            self.running_mean.mul_(1 - f).add_(f * mean.detach().double())
            self.running_var.mul_(1 - f).add_(f * var.detach().double() * count / (count - 1))
        shape = (1, -1, 1, 1)
        return (y - mean.view(shape)) / (var.view(shape) + self.eps).sqrt() * gamma.view(shape) \
            + beta.view(shape)
