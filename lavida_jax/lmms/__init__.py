"""lavida-jax models inside stock lmms-eval (0.7.x), registered as a plugin.

setup.cfg declares the entry point `lmms_eval.models: lavida_jax =
lavida_jax.lmms:manifests`; lmms-eval 0.7 loads that group when it builds its model
registry (`ModelRegistryV2.load_entrypoint_manifests`), so `--model lavida_jax`
works without a fork. This module stays import-light (no JAX): lmms-eval imports it
for every run, whatever model is asked for.
"""

MODEL_CLASS = "lavida_jax.lmms.model.LavidaJax"


def manifests():
  """The entry point's payload: one ModelManifest for `--model lavida_jax`."""
  from lmms_eval.models.registry_v2 import ModelManifest  # pylint: disable=g-import-not-at-top
  return [ModelManifest(model_id="lavida_jax", simple_class_path=MODEL_CLASS,
                        aliases=("lavida-jax",))]
