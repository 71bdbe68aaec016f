"""Built-in chat templates (`<name>.jinja`), shipped as package data so that installed copies find them."""
