"""The model: the Qwen2.5-VL backbone, the local tokenizer, the vision heads, OrionModel, its KL teacher."""
