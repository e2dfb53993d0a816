"""The README's short code examples (section "Kernels from architectures") run as written, in order."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_kernel_snippets_run_and_give_the_documented_shapes():
    text = README.read_text()
    section = text.split("## Kernels from architectures", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 3, "expected the layer example, the pooling example and the NTK example"
    namespace: dict = {}
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["Kxx"].shape == (20, 20) and torch.equal(namespace["Kxx"], namespace["Kxx"].T)
    assert namespace["Kxz"].shape == (20, 10) and namespace["Kdiag"].shape == (20,)
    assert torch.equal(namespace["Kdiag"], namespace["Kxx"].diagonal())
    assert namespace["net"](namespace["X"]).shape == (20, 10)
    K = namespace["K"]
    assert K.shape == (20, 10) and bool(torch.isfinite(K).all()) and bool((K > 0).all())
    theta = namespace["Theta"]
    assert theta.shape == (20, 10) and bool(torch.isfinite(theta).all())
    torch.testing.assert_close(namespace["K_nngp"], namespace["Kxz"], rtol=1e-5, atol=0.0)
    assert bool((theta > namespace["K_nngp"]).all())  # the NTK adds every layer's contribution to the last K
    assert namespace["wide"](namespace["X"]).shape == (20, 1)
