"""free_port: a port nothing asking for port 0 can be handed, free now, never the same twice in a process."""

from __future__ import annotations

import random
import socket

from dspark.stack import port


def test_the_port_lies_between_rays_worker_ports_and_the_kernels_ephemeral_range():
    low = port.ephemeral_start()
    ports = [port.free_port() for _ in range(50)]
    assert all(port.RAY_WORKER_PORTS_END < p < low for p in ports)
    assert len(set(ports)) == len(ports)  # six ports asked for before any is bound must differ


def test_the_ephemeral_range_comes_from_proc_with_linuxs_default_when_it_cannot_be_read(tmp_path):
    f = tmp_path / "ip_local_port_range"
    f.write_text("40000\t60999\n")
    assert port.ephemeral_start(f) == 40000
    assert port.ephemeral_start(tmp_path / "missing") == port.FALLBACK_EPHEMERAL_START
    f.write_text("")
    assert port.ephemeral_start(f) == port.FALLBACK_EPHEMERAL_START


def test_a_port_someone_listens_on_is_not_free_and_is_never_chosen():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert not port.is_free(taken)

        class Fixed(random.Random):
            def randint(self, a, b):
                return taken

        # every try draws the taken port: the chooser gives up and asks the kernel instead
        chosen = port.free_port(Fixed(), tries=3)
        assert chosen != taken and port.is_free(chosen)
