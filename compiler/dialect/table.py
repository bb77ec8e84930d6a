"""What tunefile does with each Axolotl key that is not one of its own Spec keys.

Three lists, each with the reason a user is shown (``explain`` and the README's config reference print them):

- ``NO_EFFECT``: keys that tune Hugging Face's Trainer, the Hub or a speed-only kernel, and mean nothing
  for tunefile's own loop. Accepted, and ``explain`` says they have no effect.
- ``REFUSED``: Axolotl features tunefile does not carry out. A config that leaves one at Axolotl's default
  (or empty) compiles; one that sets it is refused with the reason, which says what tunefile does instead.
- ``OUT_OF_SCOPE``: keys that make the whole config a kind of training tunefile does not do (preference/RL,
  multimodal, reward models). Such a config is refused with one line naming the feature, and nothing else.

Every other key of Axolotl's schema (``axolotl_keys.json``) is refused, when set, with a generic reason.
"""

from __future__ import annotations

_TRAINER_ONLY = "tunes Hugging Face's Trainer; tunefile runs its own training loop"
_SPEED_KERNEL = "selects a speed-only kernel; tunefile runs the model's own code (the results are the same)"
_LORA_KERNEL = "Axolotl's fused LoRA Triton kernels are a speed option; tunefile runs PEFT's LoRA layers"
_HUB = "concerns the Hugging Face Hub; tunefile never uploads, and reads HF_TOKEN from the environment"

NO_EFFECT: dict[str, str] = {
    "strict": "in Axolotl it governs command-line overrides of the YAML; tunefile has none and always validates "
              "strictly",
    "remove_unused_columns": "tunefile builds its batches from the columns it reads; there is nothing to remove",
    "ddp_find_unused_parameters": _TRAINER_ONLY + " (accelerate's DDP settings apply)",
    "ddp_timeout": _TRAINER_ONLY, "ddp_bucket_cap_mb": _TRAINER_ONLY, "ddp_broadcast_buffers": _TRAINER_ONLY,
    "dataloader_num_workers": _TRAINER_ONLY, "dataloader_pin_memory": _TRAINER_ONLY,
    "dataloader_prefetch_factor": _TRAINER_ONLY, "dataloader_drop_last": _TRAINER_ONLY,
    "include_tokens_per_second": "tunefile always logs tokens per second",
    "save_safetensors": "tunefile always saves safetensors",
    "save_only_model": "tunefile's checkpoints always hold the optimizer state, so that runs resume exactly",
    "lora_mlp_kernel": _LORA_KERNEL, "lora_qkv_kernel": _LORA_KERNEL, "lora_o_kernel": _LORA_KERNEL,
    "lora_embedding_kernel": _LORA_KERNEL,
    "use_kernels": "kernels from the Hugging Face Hub are downloaded at run time, which tunefile never does; "
                   "the model's own code runs",
    "use_scattermoe": _SPEED_KERNEL, "use_sonicmoe": _SPEED_KERNEL, "experts_implementation": _SPEED_KERNEL,
    "flash_attn_cross_entropy": _SPEED_KERNEL, "flash_attn_rms_norm": _SPEED_KERNEL,
    "flash_attn_fuse_mlp": _SPEED_KERNEL, "flash_optimum": _SPEED_KERNEL, "fused_attn_kernel": _SPEED_KERNEL,
    "torch_compile": "tunefile does not torch.compile the model (same results, no compile warm-up)",
    "torch_compile_mode": "tunefile does not torch.compile the model",
    "torch_compile_backend": "tunefile does not torch.compile the model",
    "gemma4_hybrid_attn_impl": "a speed option (flash-attn on sliding-window layers only); tunefile runs one "
                               "kernel for every layer (attn_implementation)",
    "flex_attn_compile_kwargs": "tunefile does not use flex attention (see attn_implementation)",
    "experimental_skip_move_to_device": "transformers places the weights; tunefile loads them where they train",
    "low_cpu_mem_usage": "transformers always loads weights lazily",
    "torchdistx_path": "tunefile does not use torchdistx",
    "push_dataset_to_hub": _HUB, "hub_model_id": _HUB, "hub_strategy": _HUB, "hf_use_auth_token": _HUB,
    "local_rank": "set by the launcher, not the config",
    "sample_packing_eff_est": "tunefile packs exactly; it needs no packing-efficiency estimate",
    "total_num_tokens": "tunefile counts tokens itself when it prepares the data",
    "dataset_processes": "tunefile's preprocessing decides its own worker count",
    "dataset_num_proc": "tunefile's preprocessing decides its own worker count",
    "eval_batch_size": "tunefile evaluates with micro_batch_size; the evaluation loss is the same token-weighted "
                       "mean at any batch size",
    "wandb_watch": "gradient histograms are not sent to wandb",
    "swanlab_log_completions": "logs preference-training completions, which tunefile does not train",
    "swanlab_api_key": "tunefile reads SwanLab's key from the environment (SWANLAB_API_KEY), so that no secret is "
                       "copied into the bundle",
    "shuffle_merged_datasets": "tunefile always shuffles the mixed rows (with seed)",
    "max_packed_sequence_len": "deprecated in Axolotl; tunefile packs into sequence_len rows",
    "streaming_multipack_buffer_size": "tunefile shuffles streamed rows through a 10,000-row buffer (Axolotl's "
                                       "default) and packs them as they arrive",
    "pretrain_multipack_attn": "tunefile keeps the documents of a streamed row from attending to each other "
                               "whenever sample_packing gives it a packing attention",
    "save_strategy": "save_steps and saves_per_epoch decide when tunefile saves",
    "eval_strategy": "eval_steps and evals_per_epoch decide when tunefile evaluates",
    "evaluation_strategy": "eval_steps and evals_per_epoch decide when tunefile evaluates",
    "ring_attn_func": "chooses ring-flash-attn's variant, a speed option; tunefile's context parallelism gathers "
                      "the keys and values (as the llama3 variant does) and runs SDPA over them",
    "heads_k_stride": "a memory/speed option of ring-flash-attn's llama3 variant, which tunefile does not use",
}

REFUSED: dict[str, str] = {
    "gptq": "GPTQ-quantised base models are not supported; use adapter: qlora on the 16-bit model",
    "expert_parallel_size": "expert parallelism is not supported; tunefile shards with FSDP or DeepSpeed ZeRO",
    "sample_packing_sequentially": "tunefile packs shuffled samples",
    "curriculum_sampling": "tunefile shuffles the rows; it does not keep them in file order",
    "accelerator_config": "accelerate is configured by the bundle's accelerate.yaml",
    "use_ray": "Ray is not supported; tunefile launches with accelerate (launch.sh) or SLURM (job.sbatch)",
    "use_onebitllms": "one-bit LLM training is not supported",
    "nvfp4_merge_aware": "NVFP4 training is not supported",
    "use_eaft": "EAFT is not supported",
    "use_dsv4_kernels": "DeepSeek-V4 kernels are not supported",
    "use_glm_dsa_kernels": "GLM sparse-attention kernels are not supported",
    "freeze_mm_modules": "multimodal models are not supported",
    "do_causal_lm_eval": "tunefile's evaluation reports the loss only",
    "eval_causal_lm_metrics": "tunefile's evaluation reports the loss only",
    "eval_table_size": "tunefile's evaluation reports the loss only",
    "eval_max_new_tokens": "tunefile's evaluation reports the loss only",
}

# Keys Axolotl's own examples write that are not in its schema: Axolotl ignores them, and so does tunefile.
IGNORED_BY_AXOLOTL = ("debug", "base_model_ignore_patterns", "flash_attn_fuse_qkv",
                      "sample_packing_seq_len_multiplier", "torch_dtype", "gptq_groupsize", "gptq_model_v1",
                      "gptq_disable_exllama")

# Keys that make the config a kind of training tunefile does not do, with the feature's name.
OUT_OF_SCOPE: dict[str, str] = {
    "rl": "preference/RL training",
    "processor_type": "multimodal training",
    "reward_model": "reward-model training",
    "process_reward_model": "process-reward-model training",
    "num_labels": "sequence-classification training",
    "diffusion": "diffusion language-model training",
    "ebft": "EBFT training",
}
# Dataset types that belong to those kinds of training.
OUT_OF_SCOPE_DATASET_TYPES: dict[str, str] = {
    "bradley_terry": "reward-model training", "stepwise_supervised": "process-reward-model training",
    "dpo": "preference/RL training", "kto": "preference/RL training", "orpo": "preference/RL training",
    "ipo": "preference/RL training", "simpo": "preference/RL training", "grpo": "preference/RL training",
}

# Axolotl keys whose schema default is None but whose documented meaning of None is this value, which is also
# what tunefile does.
EFFECTIVE_DEFAULTS: dict[str, object] = {"tokenizer_use_fast": True, "tokenizer_legacy": True}
# bitsandbytes settings tunefile always uses: a bnb_config_kwargs that asks for no other is accepted.
TUNEFILE_BNB_SETTINGS: dict[str, object] = {"bnb_4bit_use_double_quant": True, "bnb_4bit_quant_type": "nf4"}

# Values that mean "off" for a key whose Axolotl default is None (a parallel size of 1 shards nothing).
NEUTRAL_VALUES: dict[str, tuple[object, ...]] = {
    "tensor_parallel_size": (1,), "context_parallel_size": (1,), "expert_parallel_size": (1,),
    "dp_shard_size": (1,), "dp_replicate_size": (1,), "cosine_constant_lr_ratio": (0, 0.0),
}

# fsdp_config keys of FSDP1 that tunefile's accelerate.yaml sets itself.
FSDP_NO_EFFECT: dict[str, str] = {
    "limit_all_gathers": "a tuning knob tunefile leaves at accelerate's setting",
    "forward_prefetch": "a tuning knob tunefile leaves at accelerate's setting",
    "backward_prefetch": "tunefile's FSDP1 prefetches BACKWARD_PRE",
    "use_orig_params": "tunefile's FSDP1 always keeps the original parameters (LoRA needs them)",
    "sync_module_states": "follows cpu_ram_efficient_loading in tunefile (rank 0 loads, then broadcasts)",
    "final_state_dict_type": "tunefile always saves the final model in full",
    "cpu_offload_pin_memory": "offloaded parameters are pinned by FSDP itself",
}

# Plugins that only choose speed kernels: accepted, with no effect.
NO_EFFECT_PLUGINS: dict[str, str] = {
    "axolotl.integrations.kernels.KernelsPlugin": "Hub kernels are downloaded at run time, which tunefile never "
                                                  "does; the model's own code runs",
}
# Plugins tunefile does not carry out, by what they do.
PLUGIN_FEATURES: dict[str, str] = {
    "expert_parallel": "expert parallelism", "kernels": "Hub kernels",
    "diffusion": "diffusion training", "spectrum": "Spectrum layer selection", "kd": "knowledge distillation",
    "grokfast": "Grokfast", "lm_eval": "lm-eval-harness evaluation", "llm_compressor": "LLM Compressor",
    "densemixer": "DenseMixer", "mora": "MoRA adapters", "hatchery": "Hatchery", "nemo_gym": "NeMo Gym",
}
