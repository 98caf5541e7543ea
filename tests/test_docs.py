"""The README's usage snippet runs as written (on the CPU, with ShuffleNet-V2 x0.5 for ResNet-50).

The other snippets are run where their subject is tested: the "Aiming at a sparsity"
block in ``test_target_sparsity.py``, the framework pages' blocks in
``test_integrations.py``.
"""
import re
from pathlib import Path

import pytest
import torch

torchvision = pytest.importorskip("torchvision", reason="torchvision is in the test extra")

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_snippet() -> str:
    text = README.read_text()
    start = text.index("## Usage")
    blocks = re.findall(r"```python\n(.*?)```", text[start:text.index("\n### ", start)], flags=re.S)
    assert len(blocks) == 1, f"expected one python block under README's ## Usage, found {len(blocks)}"
    return blocks[0]


def test_readme_usage_snippet(tmp_path, monkeypatch):
    code = usage_snippet()
    model_line = "torchvision.models.resnet50().cuda()"
    assert model_line in code
    code = code.replace(model_line, "torchvision.models.shufflenet_v2_x0_5(num_classes=10)")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    alphas, printed = [], []

    def train_one_epoch(model, opt):
        """Two real steps on random images, then only a rising accuracy for Algorithm 1."""
        if len(alphas) < 2:
            opt.zero_grad()
            model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean().backward()
            opt.step()
        alphas.append(opt.param_groups[0]["alpha"])
        return 0.2 + 1e-3 * len(alphas)

    ns = {"train_one_epoch": train_one_epoch, "print": printed.append}
    exec(compile(code, "README.md[Usage]", "exec"), ns)
    model, opt = ns["model"], ns["opt"]

    assert len(alphas) == 100 and max(alphas) > 7e-6  # Algorithm 1 grew α (L1 > K)
    assert len(printed) == 1 and "global" in str(printed[0])
    exported = torch.load(tmp_path / "sparse.pt")
    fresh = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    fresh.load_state_dict(exported, strict=True)  # loads into the unmodified model
    split = [n for n, p in model.named_parameters() if "m" in opt.state[p]]
    zeros = sum(int((exported[n] == 0).sum()) for n in split)
    total = sum(exported[n].numel() for n in split)
    assert zeros == round(0.9 * total)
