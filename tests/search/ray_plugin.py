"""Plugin module for the Ray test: importing it registers the test technique (COMPACTAI_PLUGINS)."""

from compactai.techniques.base import register_technique
from tests.search.conftest import RoundWeights

register_technique(RoundWeights)
