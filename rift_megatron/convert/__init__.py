"""Hugging Face <-> Megatron-Core checkpoint conversion.

Importing the package filters the library warnings conversion expects (platform/expected_warnings:
Megatron's TE / Apex fallback notices, DCP's single-process notice): every conversion process, the
CLI as well as spawned writers and verify's workers, imports it before Megatron.
"""

from rift_megatron.platform.expected_warnings import silence_expected_warnings

silence_expected_warnings()
