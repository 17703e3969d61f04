"""The layout of a trained run: the server writes it (output folder and MLflow run alike), the gateway reads it."""

ADAPTER_DIR = "adapter"  # peft format: adapter_config.json + adapter_model.safetensors
CONFIG_FILE = "config.json"  # the resolved training config, to rebuild the same base model and labels
PRIVACY_REPORT_FILE = "privacy_report.json"
PRIVACY_REPORT_MARKDOWN = "privacy_report.md"
SUMMARY_FILE = "summary.json"
