"""Data sets: the checked offline folder, fine-tuning data (Tülu v2, MetaMathQA, GSM8K, Alpaca, PubMedQA), AdaptLLM."""
