"""First-run setup: what counts as missing from requirements.txt."""
from mmapp.environment import REPO, missing_requirements


def test_this_machine_has_every_pinned_requirement():
    assert missing_requirements(REPO / "requirements.txt") == []


def test_wrong_pins_and_unknown_packages_are_reported(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\nnumpy==0.0.1\nsurely-not-a-real-package-xyz==1.0\npillow>=1\n\n-e .\n")
    assert missing_requirements(req) == ["numpy==0.0.1", "surely-not-a-real-package-xyz==1.0"]
