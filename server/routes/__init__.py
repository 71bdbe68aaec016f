"""The HTTP routes, a router per concern: generation (completions, chat), the model (its card, tokenize,
detokenize) and operations (probes, metrics). Each reads `lifecycle.served`, which the admission middleware lets API
requests in only once it is set."""
