"""Flow definitions: strict ``flow.yaml`` parsing and the safe graph parser."""
