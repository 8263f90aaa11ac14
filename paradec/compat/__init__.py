"""Other runtimes' call signatures on paradec's engine."""
