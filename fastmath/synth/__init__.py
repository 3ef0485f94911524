"""Question/answer synthesis with an OpenAI-compatible API (the paper's GPT-4 Turbo pipeline).

Modules: `prompts` (the two calls, GSM8K and MATH variants), `parse` (reply fields, seed files),
`dedup` (normalisation, near-duplicates, decontamination), `client` (one retry policy around `openai`),
`pipeline` (journal, snapshot, resume, cost, `--dry-run` preview; `run_synth`), `batch` (the Batch API
rounds of `--batch`). Importing this package imports neither torch nor openai.
"""
