"""The miner's hotkey: from the usual bittensor wallet path, or made in state/ offline.

Only the hotkey is ever loaded; the coldkey stays where it is.
"""

from __future__ import annotations

from pathlib import Path

import structlog
from bittensor_wallet import Keypair, Wallet

from svd.config import WalletConfig

log = structlog.get_logger(__name__)
OFFLINE_WALLET = "svd-offline"


class WalletError(Exception):
    """The hotkey cannot be loaded; the message says which file and what to do."""


def hotkey_wallets(cfg: WalletConfig, state_dir: Path) -> tuple[Wallet, Wallet]:
    """The wallet named in `cfg`, and the one offline mode generates its hotkey in under state_dir."""
    named = Wallet(name=cfg.name, hotkey=cfg.hotkey, path=str(Path(cfg.path).expanduser()))
    return named, Wallet(name=OFFLINE_WALLET, hotkey="default", path=str(state_dir / "wallets"))


def load_hotkey(cfg: WalletConfig, state_dir: Path, offline: bool) -> Keypair:
    """The hotkey named in `cfg`; offline, fall back to one generated under state_dir."""
    wallet, local = hotkey_wallets(cfg, state_dir)
    if wallet.hotkey_file.exists_on_device():
        return _read(wallet)
    if not offline:
        raise WalletError(
            f"hotkey file {wallet.hotkey_file.path} does not exist: create it with "
            f"`btcli wallet new_hotkey --wallet.name {cfg.name} --wallet.hotkey {cfg.hotkey}` "
            "or set [wallet] in the config"
        )
    if not local.hotkey_file.exists_on_device():
        local.create_new_hotkey(use_password=False, overwrite=False, suppress=True)
        log.info("offline_hotkey_created", path=local.hotkey_file.path)
    return _read(local)


def _read(wallet: Wallet) -> Keypair:
    path = wallet.hotkey_file.path
    try:
        if wallet.hotkey_file.is_encrypted():
            raise WalletError(
                f"hotkey file {path} is encrypted: a daemon cannot type its password; "
                "regenerate the hotkey without a password (`btcli wallet regen_hotkey --no-use-password`)"
            )
        return wallet.hotkey
    except WalletError:
        raise
    except Exception as e:  # bittensor_wallet raises its own KeyFileError for bad files
        raise WalletError(f"cannot read hotkey file {path}: {e}") from e
