"""One module per subcommand; each imports torch and bnfold only inside its function body."""

from bnfold_cli.commands.demo import demo
from bnfold_cli.commands.export import export
from bnfold_cli.commands.fold import fold
from bnfold_cli.commands.inspect import inspect
from bnfold_cli.commands.recalibrate import recalibrate
from bnfold_cli.commands.verify import verify

COMMANDS = [demo, inspect, fold, export, verify, recalibrate]
