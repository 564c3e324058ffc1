"""Check an exported folder in a Python process where poetx cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent


def assert_loads_without_poetx(dest: Path, ids: torch.Tensor, logits: torch.Tensor,
                               tmp_path: Path, tokenizer_text: str | None = None) -> None:
    """``dest`` loads with transformers in a process where poetx cannot be imported and gives
    ``logits`` on ``ids`` (max abs difference < 1e-4); with ``tokenizer_text``, the folder's
    tokenizer also round-trips that text."""
    ref = tmp_path / "expected.safetensors"
    save_file({"ids": ids, "logits": logits.contiguous()}, str(ref))
    script = textwrap.dedent(f"""
        import os, sys
        repo = {str(REPO)!r}
        sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != repo]

        class HidePoetx:
            def find_spec(self, name, path=None, target=None):
                if name == "poetx" or name.startswith("poetx."):
                    raise ImportError("poetx is hidden in this test")
                return None

        sys.meta_path.insert(0, HidePoetx())
        try:
            import poetx  # noqa: F401
            sys.exit("poetx importable")
        except ImportError:
            pass
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(dest)!r}).eval()
        ref = load_file({str(ref)!r})
        with torch.no_grad():
            logits = model(input_ids=ref["ids"]).logits
        diff = (logits - ref["logits"]).abs().max().item()
        assert diff < 1e-4, diff
        text = {tokenizer_text!r}
        if text is not None:
            tok = AutoTokenizer.from_pretrained({str(dest)!r})
            assert tok.decode(tok(text)["input_ids"]) == text
        assert not any(m.startswith("poetx") for m in sys.modules)
        print("ok", type(model).__name__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout
