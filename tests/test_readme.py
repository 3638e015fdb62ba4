"""The README's usage example runs as written and prints what its comments say."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    usage = text[text.index("## Usage"):]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # the example saves a checkpoint in the working directory
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    # lines a library logs to stdout (DeepSpeed's accelerator notice when transformers finds it installed) aside
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("[20")]
    assert printed[:4] == ["torch.Size([3, 3]) torch.Size([3, 64])", "[[True, True], [True, False], [False, True]]",
                           "torch.Size([3, 2, 64])", "[[True, False]] torch.Size([1, 2])"]
    assert printed[4] == "dict_keys(['score', 'label'])"
    assert (tmp_path / "my-calmrl" / "model.safetensors").exists()
    assert (tmp_path / "my-calmrl" / "processor_config.json").exists()
