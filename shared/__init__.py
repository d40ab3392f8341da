"""The course's reusable pieces, one module per concept, in chapter order.

Each chapter builds a piece step by step in its notebook; the final form lives here and
every later chapter imports it. The map: ``shared.<module>`` (chapter): main public names.

- ``shared.utils`` (all): get_device, available_devices, set_seed, is_quick, by_mode, banner, atomic_path, write_json, eval_mode,
  run_dir, exit_on_error, check_writable, add_output_args, is_disk_full, CheckpointError
- ``shared.download`` (all): download, host_url, safe_extract_zip, DownloadError, ChecksumError, DestinationError
- ``shared.data`` (all): data_dir, fetch, REMOTE_FILES, load_the_verdict, load_sms_spam, load_instruction_data, validate_instruction_entries, DataValidationError
- ``shared.tokenizer`` (ch02): simple_split, build_vocab, SimpleTokenizerV1, SimpleTokenizerV2, get_gpt2_tokenizer, encode_text, check_token_ids, GPT2_VOCAB_SIZE, GPT2_EOT_ID, END_OF_TEXT, UNKNOWN
- ``shared.bpe`` (ch02): BPETokenizer, bytes_to_unicode, GPT2_SPLIT_PATTERN
- ``shared.dataloader`` (ch02): GPTDataset, create_dataloader, train_val_loaders
- ``shared.attention`` (ch03): MultiHeadAttention, KVCache
- ``shared.model`` (ch04): GPTModel, GPTConfig, GPT_CONFIGS, FeedForward, check_config, build_on_meta, count_parameters, set_dropout
- ``shared.generate`` (ch04): generate, next_token, generate_text_simple, beam_search, sequence_logprob
- ``shared.weights`` (ch05): load_hf_gpt2, CheckpointError (from shared.utils), save_hf_gpt2, download_gpt2, config_from_hf, config_to_hf, load_gpt2_or_standin, STANDIN_CONFIG, BaseModel,
  HF_REPOS, CONFIG_FILE, WEIGHTS_FILE
- ``shared.train`` (ch05): train_model, TrainSettings, train_step, evaluate_and_record, calc_loss_batch, calc_loss_loader,
  evaluate_model, model_device, check_device, make_optimizer, autocast, lr_at, WarmupCosine, save_training_run, LossWatch,
  NonFiniteLossError, EmptyLoaderError, TrainHistory (from checkpoint)
- ``shared.checkpoint`` (ch05): save_checkpoint, load_checkpoint, read_checkpoint, resume, TrainHistory, step_checkpoints,
  save_step_checkpoint, newest_checkpoint, prepare_checkpoint_folder, check_model_matches, CheckpointError
- ``shared.corpus`` (ch05): prepare_corpus, prepare_for_training, choose_prepared_dir, PreparedCorpus, WindowSampler,
  read_windows, fixed_windows, CorpusError
- ``shared.classification`` (ch06): prepare_spam_splits, read_split, SpamDataset, pad_batch, create_classification_loader, make_classifier, count_trainable, classifier_logits, last_real_token_index, classification_loss, loss_from_logits, predict_from_logits, accuracy_callback, calc_accuracy_loader, classify_text, save_classifier, load_classifier, POOLINGS, PAD_TOKEN_ID
- ``shared.instruction`` (ch07): format_input, parse_score, format_prompt, split_entries, InstructionDataset, collate_fn, generate_batch_ids, generate_responses, clean_response, rouge_l, exact_match, response_perplexity, PROMPT_STYLES, SMALL_MODEL_CONFIG, SMALL_MODEL_LR, PRETRAINED_LR
- ``shared.judge`` (ch07): make_judge, judge_prompt, parse_score, score_responses, JudgeError, DEFAULT_JUDGE_MODEL, HOW_TO_START_A_JUDGE
- ``shared.distributed`` (appendix_A): distributed_session, DistributedInfo, launch_torchrun, print_main, mean_across_processes, unwrap
- ``shared.serving`` (ch07): BatchingEngine, SamplingSettings, Event, TextAssembler
- ``shared.lora`` (appendix_E): LoRALayer, LinearWithLoRA, apply_lora, merge_lora, unmerge_lora, remove_lora, lora_layers, lora_state_dict, load_lora_state_dict, KINDS
- ``shared.exercises`` (all): check, EXERCISES
"""

__version__ = "0.1.0"
