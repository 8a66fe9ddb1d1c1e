"""streams.yaml: its schema, the bounded YAML reader, `file:line: field` problems, `${...}`
secrets and their redaction."""
