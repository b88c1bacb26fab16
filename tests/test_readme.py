from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    readme = (ROOT / "README.md").read_text()
    assert "pytest" in ci_command
    assert f"```bash\n{ci_command}\n```" in readme
