"""Stand-in for the pip bootstrap script that ansible-test downloads.

ansible-test creates its sanity-test virtualenvs without pip and brings pip in
with a get-pip script it downloads from Ansible's own file server, which this
project's machines cannot reach (they reach the package registries only).
When the script is already in ansible-test's cache it is used instead; setup.sh
puts this file there.

ansible-test runs it as `python SCRIPT [pip options] pip==X setuptools==Y
wheel==Z`. Like the real script, it installs those packages with pip from the
package index; the pip that does it is the interpreter's own bundled one
(ensurepip, no network).
"""

import ensurepip
import os
import subprocess
import sys

# ensurepip drops every PIP_* variable and points PIP_CONFIG_FILE at
# /dev/null in this process; the install must see the machine's pip
# configuration (its index, its CA bundle), so it gets the environment as it was.
env = dict(os.environ)
ensurepip.bootstrap()
sys.exit(subprocess.call([sys.executable, '-m', 'pip', 'install'] + sys.argv[1:], env=env))
