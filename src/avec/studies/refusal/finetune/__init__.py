"""Supervised fine-tuning on instruction/response pairs (LoRA or full), sized for CPUs.

>>> from avec.studies.refusal.finetune import FinetuneConfig, finetune, load_examples, save_finetuned
>>> result = finetune(model, load_examples("refusals.jsonl"), FinetuneConfig())
>>> save_finetuned(result, "smollm2-refuses")          # loads with avec.load_model(dir)

Each example becomes ``prompt + target`` tokens: the prompt is exactly what generation feeds
the model (:meth:`Model.chat_prompt`, the chat template with its generation prompt, or the
plain instruction when the model has no template) and the target is the response followed by
the template's end-of-turn text (``<|im_end|>\\n`` for SmolLM2), as the template itself renders
an assistant turn. The loss is the mean cross-entropy over target tokens only.
"""

from avec.studies.refusal.finetune.config import (DEFAULT_FULL_LR, DEFAULT_LORA_LR, METADATA_FILE,
                                                  FinetuneConfig)
from avec.studies.refusal.finetune.encode import (EncodedExample, TurnFormat, collate,
                                                  encode_example, response_loss, turn_format)
from avec.studies.refusal.finetune.examples import (IGNORE_INDEX, Example, FinetuneError,
                                                    load_examples, save_examples)
from avec.studies.refusal.finetune.train import FinetuneResult, finetune, save_finetuned

__all__ = ["DEFAULT_FULL_LR", "DEFAULT_LORA_LR", "IGNORE_INDEX", "METADATA_FILE", "EncodedExample",
           "Example", "FinetuneConfig", "FinetuneError", "FinetuneResult", "TurnFormat", "collate",
           "encode_example", "finetune", "load_examples", "response_loss", "save_examples",
           "save_finetuned", "turn_format"]
