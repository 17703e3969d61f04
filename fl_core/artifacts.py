"""The layout of a trained run: the server writes it (output folder and MLflow run alike), the gateway reads it."""

ADAPTER_DIR = "adapter"  # peft format: adapter_config.json + adapter_model.safetensors
CONFIG_FILE = "config.json"  # the resolved training config, to rebuild the same base model
LABELS_FILE = "labels.json"  # the classifier's label names in index order (public: the dataset's label set)
PRIVACY_REPORT_FILE = "privacy_report.json"
PRIVACY_REPORT_MARKDOWN = "privacy_report.md"
SUMMARY_FILE = "summary.json"
