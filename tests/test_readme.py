"""The README's usage example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    usage = text[text.index("## Usage"):]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # the example saves a checkpoint in the working directory
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "torch.Size([4, 2, 16]) torch.Size([4, 2])" in printed and "tensor(True)" in printed
    assert "torch.Size([3, 3])" in printed
    assert (tmp_path / "my-calmrl" / "model.safetensors").exists()
