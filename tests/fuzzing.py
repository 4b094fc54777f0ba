"""How many examples a property test runs: its own quick count in the suite, FUZZ_EXAMPLES
(default 20,000) in the long fuzzing run (`./run.sh fuzz` sets HYPOTHESIS_PROFILE=long)."""
import os


def examples(quick: int) -> int:
    if os.environ.get("HYPOTHESIS_PROFILE") == "long":
        return int(os.environ.get("FUZZ_EXAMPLES", "20000"))
    return quick
