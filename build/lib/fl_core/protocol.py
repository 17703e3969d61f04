"""Keys of the plaintext messages between the server and hospitals' nodes besides training itself."""

RUN_ID = "run-id"  # in every fit config and ledger message: the run's id in the hospitals' ledgers
LEDGER_ACTION = "ledger-action"  # a get_properties message: admit, committed or aborted
ADMIT = "admit"
