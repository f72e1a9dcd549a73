"""Signed deployment bundles: build, sign and verify (see docs/bundle.md).

    private, public = generate_keypair("keys/")
    build_bundle("out/quantized", "bundle-v3", load_private_key(private), version=3)
    verify_bundle("bundle-v3", VerifyPolicy([load_public_key(public)]))   # raises BundleRefused
"""

from compactai.bundle.build import build_bundle, write_signed_manifest
from compactai.bundle.manifest import (
    GOLDEN_INPUTS_FILE,
    GOLDEN_OUTPUTS_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    BundleRefused,
    canonical_bytes,
    parse_manifest,
)
from compactai.bundle.signing import generate_keypair, key_id, load_private_key, load_public_key
from compactai.bundle.stage import VerifyPolicy, read_metadata, stage_bundle, verify_metadata
from compactai.bundle.verify import VerifiedBundle, validate_model, verify_bundle

__all__ = [
    "GOLDEN_INPUTS_FILE", "GOLDEN_OUTPUTS_FILE", "MANIFEST_FILE", "MODEL_FILE", "SIGNATURE_FILE",
    "BundleRefused", "VerifiedBundle", "VerifyPolicy", "build_bundle", "canonical_bytes", "generate_keypair",
    "key_id", "load_private_key", "load_public_key", "parse_manifest", "read_metadata", "stage_bundle",
    "validate_model", "verify_bundle", "verify_metadata", "write_signed_manifest",
]
