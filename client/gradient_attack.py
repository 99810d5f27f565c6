"""The gradient attack on split training: what the trunk's operator reads of the training labels from what crosses.

In a U-shaped step the trunk sends its output h to the client, and the client sends back g = dL/dh, where L is
the mean cross-entropy of the top's logits against the labels (the next tokens of the private text). The top
blocks, the final norm and the LM head are public weights (with `--client-train none` they are exactly the
client's). For logits z_t = W u_t(h):

    dL/dh = 1/N sum_t (dz_t/dh)^T (softmax(z_t) - onehot(y_t))

so A = sum_t (dz_t/dh)^T softmax(z_t), which the trunk computes from h alone, gives
R = A - N g = sum_t d z_t[y_t] / dh. Causality makes this triangular: position s of R holds its own label's
term (du_s/dh_s)^T W[y_s] plus the terms of the labels after it. Going from the last position back, the trunk
subtracts the terms of the labels already read, which leaves, for each candidate label, the gradient the client
would have computed at s; it picks the candidate under which what it received is likeliest. Exact up to float
error when the client's top is the public one; against a top the client trained (`--client-train lora|full`)
the public top is the attacker's best guess.

The client's gradient defence is the states' mechanism (`splitcore.defence.Noise`) on the gradient: `--grad-clip
C` scales each position's gradient down to an RMS of at most C, and `--grad-noise S` adds gaussian noise of std S
times the reference RMS (C when clipping, else the position's own). The attacker knows the code, so it scores each
candidate's gradient, clipped as the client would have clipped it, with the mechanism's own density
(`Noise.log_likelihood`); under noise it reads MAP, adding the log-probability of the label under the public model
at that position (the prior: what the text says next).
"""

from __future__ import annotations

import torch

from client.exact_attack import Prefixes
from splitcore.defence import Noise
from splitcore.gpt2 import GPT2


class GradientLabels:
    """Reads the labels of a split training step from the trunk's output and the gradient the client sent."""

    name = "gradient attack (public top)"

    def __init__(self, top: GPT2, noise: Noise | None = None):
        self.top = top.eval().requires_grad_(False)
        self.noise = noise or Noise()  # the client's --grad-noise and --grad-clip: the attacker knows the code

    def _u(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm's output (B, T, d): the LM head's input."""
        return self.top.ln_f(self.top.hidden(h))

    def read(self, h: torch.Tensor, grad: torch.Tensor, n_terms: int | None = None) -> torch.Tensor:
        """Labels (B, T-1) of a step from the trunk's output `h` (B, T, d) and the gradient `grad` received for it.
        `n_terms`: how many positions the loss averages over (the code's lm_loss: B * (T-1))."""
        b, t, _ = h.shape
        n = n_terms or b * (t - 1)
        return torch.stack([self._window(h[i : i + 1].detach().float(), grad[i].detach().float(), n) for i in range(b)])

    def _window(self, h: torch.Tensor, g: torch.Tensor, n: int) -> torch.Tensor:
        top, w = self.top, self.top.lm_head.weight.float()  # (V, d)
        t = h.shape[1]
        with torch.enable_grad():
            x = h.clone().requires_grad_(True)
            z = top.lm_head(self._u(x))[0, :-1]  # (T-1, V): the positions the loss counts
            log_p = torch.log_softmax(z.float(), -1).detach()  # (T-1, V): the public model's prior
            soft = (log_p.exp() * z).sum()
            (a,) = torch.autograd.grad(soft, x)
        known = a[0].clone()  # (T, d): A less the terms of the labels read so far (n g + the labels not yet read)
        labels = torch.zeros(t - 1, dtype=torch.long)
        window = Prefixes(top, 1)  # every position's keys and values: the prefix that position s attends to
        with torch.no_grad():
            for s in range(t):
                window.run_states(h[:, s : s + 1], keep=True)
        for s in range(t - 2, -1, -1):
            jac = self._jacobian(window.first(s), h[0, s])  # (d, d): du_s / dh_s
            own = w @ jac  # (V, d): the term each candidate label would leave at position s
            clean = (known[s] - own) / n  # (V, d): the gradient the client computed at s, were its label each one
            score = self.noise.log_likelihood(g[s], clean)  # the client's mechanism: clipping, noise, or neither
            y = int((score + log_p[s] if self.noise.scale > 0 else score).argmax())
            labels[s] = y
            with torch.enable_grad():  # take this label's terms out of every earlier position
                x = h[:, : s + 1].clone().requires_grad_(True)
                (gy,) = torch.autograd.grad(self._u(x)[0, s] @ w[y], x)  # z_s[y]: one row of the LM head
            known[: s + 1] -= gy[0]
        return labels

    def _jacobian(self, prefix: Prefixes, h_s: torch.Tensor) -> torch.Tensor:
        """du_s/dh_s (d_out, d_in) by one batched backward pass over d copies of position s, each attending to
        the prefix's keys and values (which do not depend on h_s): row i is the gradient of u_s[i]."""
        d = h_s.shape[-1]
        with torch.enable_grad():
            x = h_s.float().expand(1, d, d).clone().requires_grad_(True)  # (1, d copies, d)
            u = self.top.ln_f(prefix.run_states(x, keep=False))[0]  # (d, d): copy i's u_s
            (gx,) = torch.autograd.grad(u.diagonal().sum(), x)
        return gx[0]  # (d_out, d_in)


class StepTap:
    """Wraps a split trainer's remote: keeps, for each training step, what the trunk holds (its output) and what
    the client sent back (the gradient) in `steps`, and the states the client sent in `sent`, as the trunk's
    operator would."""

    def __init__(self, remote):
        self.remote, self.steps, self.sent = remote, [], []
        self._out = None

    def forward(self, step, h, eval: bool = False):
        reply = self.remote.forward(step, h, eval=eval)
        if not eval:
            self._out = reply.tensor.detach().clone()
            self.sent.append(h.detach().clone())
        return reply

    def backward(self, step, grad):
        self.steps.append((self._out, grad.detach().clone()))
        return self.remote.backward(step, grad)

    def __getattr__(self, name):
        return getattr(self.remote, name)
