"""Hypothesis profile for the long fuzzing run (`./run.sh fuzz`, docs/hardening.md): no
deadline, no health checks; example counts come from tests/fuzzing.py."""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("long", deadline=None, suppress_health_check=list(HealthCheck))
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
