"""dkvb.provenance: results name the code that produced them."""
import re

from dkvb.provenance import code_version, run_date


def test_the_code_version_is_a_commit_or_the_package_version():
    assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?|dkvb .+", code_version())
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", run_date())
