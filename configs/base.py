"""Defaults shared by every setup; each config file starts from `base()` and edits it."""
import ml_collections


def parse_arg(arg: str | None, **defaults) -> dict:
  """'model=lavida-llada,stage=2' -> dict, refusing unknown keys."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"unknown config argument {item!r}; expected key=value with key in "
                       f"{sorted(defaults)}")
    out[key] = type(defaults[key])(value) if defaults[key] is not None else value
  return out


def base(model: str = "lavida-llada", stage: int = 2) -> ml_collections.ConfigDict:
  if model not in ("lavida-llada", "lavida-dream", "llada-v"):
    raise ValueError(f"unknown model {model!r}; expected lavida-llada, lavida-dream or llada-v")
  if stage not in (1, 2, 3):
    raise ValueError(f"unknown stage {stage}; expected 1, 2 or 3 (FIM)")
  c = ml_collections.ConfigDict()
  c.workdir = ""
  c.mesh = (1, -1, 1)  # (data, fsdp, tensor) within a slice; -1 = the remaining devices
  # Slices per axis (multi-slice TPU): (2, 1, 1) puts the data axis across 2 slices, so
  # only the gradient all-reduce crosses the slow inter-slice network.
  c.dcn_mesh = (1, 1, 1)
  c.log_every = 10

  c.model = ml_collections.ConfigDict()
  c.model.family = model
  c.model.size = "full"  # full | tiny
  c.model.image_size = 384
  c.model.anyres = stage != 1  # stage 1: one 384² view, 729 tokens, no newline
  c.model.init = ""  # a Hugging Face or Orbax folder to start from
  c.model.lm = ml_collections.ConfigDict()  # LMConfig field overrides
  c.model.vision = ml_collections.ConfigDict()  # SiglipConfig field overrides

  c.data = ml_collections.ConfigDict()
  c.data.source = ""  # a tfds data_dir, a LLaVA JSON/JSONL file, or "demo"
  c.data.image_folder = ""
  c.data.tokenizer = ""  # a tokenizer folder/file; "demo": the shipped demo tokenizer
  c.data.length = 8192 if stage == 1 else 4096
  c.data.system_prompt = True  # the LaViDa system prompt in every example
  c.data.num_workers = 0
  c.data.read_threads = 2

  c.train = ml_collections.ConfigDict()
  c.train.stage = stage
  c.train.steps = 1000
  c.train.batch_size = 256 if stage == 1 else 128  # global
  c.train.grad_accum = 1
  c.train.lr = ml_collections.ConfigDict(
      dict(vision=2e-6, projector=2e-5, lm=2e-5) if stage != 1 else
      dict(vision=0.0, projector=1e-3, lm=0.0))
  c.train.warmup_ratio = 0.03
  c.train.final_ratio = 0.0 if stage == 1 else 0.1
  c.train.weight_decay = 0.0
  c.train.clip_norm = 1.0
  c.train.masking = "iid" if model == "llada-v" else "complementary"
  c.train.weighting = "inv_t" if model == "llada-v" else "none"
  c.train.normalize = "per_sequence" if model == "llada-v" else "tokens"
  c.train.eps = 1e-3
  c.train.vocab_chunk = 8192
  c.train.capacity = 0  # gathered masked positions per step; 0: every position
  c.train.remat = "full"
  c.train.param_dtype = "float32"
  c.train.compute_dtype = "bfloat16"
  c.train.seed = 0

  # LoRA (models/lora.py): rank 0 = off. On: only the adapters train (fp32, at lora.lr),
  # on the frozen base model.init (param_dtype, or int8 with quantize="int8": QLoRA);
  # checkpoints hold the adapters and lora.json naming the base.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 32.0  # scale alpha / rank
  c.lora.dropout = 0.0
  c.lora.targets = "q,k,v,o,gate,up,down"  # + "head", "projector", "vision"
  c.lora.lr = 2e-4
  c.lora.lr_projector = 0.0  # the projector's and the tower's adapters (0: lora.lr)
  c.lora.lr_vision = 0.0
  c.lora.quantize = ""

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0  # steps; 0: only at the end
  c.eval.data = ""  # held-out LLaVA JSON/JSONL ("" with data.source=demo: its held-out split)
  c.eval.num_examples = 200
  c.eval.batch_size = 16
  c.eval.gen_length = 32
  c.eval.block_length = 32
  c.eval.steps = 32
  c.eval.schedule = "shift"
  c.eval.alpha = 1 / 3
  c.eval.cache = "prefix"  # none | prefix | dual (SPEC §7.3, §14)
  c.eval.decoder = "fixed"  # fixed | threshold | factor
  c.eval.threshold = 0.9
  c.eval.factor = 1.0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500
  c.checkpoint.keep = 3
  return c


def full_size(arg: str | None, *, workdir: str, data_root: str, mesh: dict,
              grad_accum: dict, remat: dict, attention_impl: str):
  """A full-size LaViDa config (TPU pod or GPU machine); by-stage dicts pick the rest.

  data_root: holds data/, images/ and tokenizer/ (a bucket on TPU); mesh: stage ->
  (data, fsdp, tensor); grad_accum: stage -> micro-batches per step; remat: stage ->
  policy.
  """
  args = parse_arg(arg, model="lavida-llada", stage=2)
  stage = args["stage"]
  c = base(args["model"], stage)
  c.workdir = workdir
  c.mesh = mesh[stage]
  c.model.size = "full"
  c.model.image_size = 384
  c.model.lm.attention_impl = attention_impl  # also the vision tower's
  c.data.source = f"{data_root}/data"  # tfds data_dir or LLaVA JSON
  c.data.image_folder = f"{data_root}/images"
  c.data.tokenizer = f"{data_root}/tokenizer"
  c.data.num_workers = 8
  # train.batch_size is one micro-batch; a step sees batch_size x grad_accum examples
  # (SPEC §6.3: 256 in stage 1, 128 after).
  c.train.grad_accum = grad_accum[stage]
  c.train.batch_size = (256 if stage == 1 else 128) // c.train.grad_accum
  # The two complementary views partition each example's label tokens (<= T), so
  # micro-batch x T is a safe bound on gathered positions (the default is 2 x that).
  c.train.capacity = c.train.get_ref("batch_size") * c.data.get_ref("length")
  c.train.remat = remat[stage]
  c.train.param_dtype = "float32"
  c.train.compute_dtype = "bfloat16"
  c.checkpoint.every = 1000
  return c
