//! The engine test harness shared by the store_engine* tests: an engine with dom0 and two
//! guests connected, and helpers to send requests and read replies.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

pub use ipc::xenstore::engine::{ConnId, DomainEvent, Engine};
pub use ipc::xenstore::wire::{Message, MsgType, XsError};
pub use ipc::xenstore::Quotas;

pub const D0: ConnId = ConnId(1);
pub const G5: ConnId = ConnId(5);
pub const G6: ConnId = ConnId(6);

pub struct H {
    pub e: Engine,
    req: u32,
}

pub fn s(parts: &[&str]) -> Vec<u8> {
    Message::strings(parts)
}

impl H {
    /// dom0 plus guests 5 and 6, introduced, with homes owned by themselves.
    pub fn new() -> H {
        H::with_quotas(Quotas::default())
    }

    pub fn with_quotas(q: Quotas) -> H {
        let mut h = H {
            e: Engine::new(q),
            req: 0,
        };
        h.e.connect(D0, 0, true).unwrap();
        for (c, d) in [(G5, 5), (G6, 6)] {
            h.ok(D0, MsgType::Introduce, &s(&[&d.to_string(), "0", "0"]));
            let home = format!("/local/domain/{d}");
            h.ok(D0, MsgType::Mkdir, &s(&[&home]));
            h.ok(D0, MsgType::SetPerms, &s(&[&home, &format!("n{d}")]));
            h.e.connect(c, d, false).unwrap();
        }
        h.e.take_domain_events();
        h
    }

    pub fn send(
        &mut self,
        c: ConnId,
        ty: MsgType,
        tx: u32,
        payload: &[u8],
    ) -> Vec<(ConnId, Message)> {
        self.req += 1;
        let out = self
            .e
            .handle(c, Message::new(ty, self.req, tx, payload.to_vec()));
        if let Some((to, reply)) = out.first() {
            assert_eq!(*to, c);
            assert_eq!(reply.req_id, self.req);
            assert_eq!(reply.tx_id, tx);
        }
        out
    }

    pub fn tx_ok(&mut self, c: ConnId, ty: MsgType, tx: u32, payload: &[u8]) -> Vec<u8> {
        let out = self.send(c, ty, tx, payload);
        let r = &out[0].1;
        assert_eq!(r.ty, ty, "expected success, got {r}");
        r.payload.clone()
    }

    pub fn tx_err(&mut self, c: ConnId, ty: MsgType, tx: u32, payload: &[u8]) -> XsError {
        let out = self.send(c, ty, tx, payload);
        out[0]
            .1
            .as_error()
            .unwrap_or_else(|| panic!("expected error, got {}", out[0].1))
    }

    pub fn ok(&mut self, c: ConnId, ty: MsgType, payload: &[u8]) -> Vec<u8> {
        self.tx_ok(c, ty, 0, payload)
    }

    pub fn err(&mut self, c: ConnId, ty: MsgType, payload: &[u8]) -> XsError {
        self.tx_err(c, ty, 0, payload)
    }

    pub fn write(&mut self, c: ConnId, path: &str, v: &str) {
        let mut p = s(&[path]);
        p.extend_from_slice(v.as_bytes());
        self.ok(c, MsgType::Write, &p);
    }

    pub fn write_err(&mut self, c: ConnId, path: &str, v: &str) -> XsError {
        let mut p = s(&[path]);
        p.extend_from_slice(v.as_bytes());
        self.err(c, MsgType::Write, &p)
    }

    pub fn read(&mut self, c: ConnId, path: &str) -> Result<Vec<u8>, XsError> {
        let out = self.send(c, MsgType::Read, 0, &s(&[path]));
        match out[0].1.as_error() {
            Some(e) => Err(e),
            None => Ok(out[0].1.payload.clone()),
        }
    }

    pub fn perms(&mut self, c: ConnId, path: &str) -> String {
        let p = self.ok(c, MsgType::GetPerms, &s(&[path]));
        String::from_utf8(p)
            .unwrap()
            .trim_end_matches('\0')
            .replace('\0', " ")
    }

    /// Watch events in an output, as (conn, path, token).
    pub fn events(out: &[(ConnId, Message)]) -> Vec<(ConnId, String, String)> {
        out.iter()
            .filter(|(_, m)| m.ty == MsgType::WatchEvent)
            .map(|(c, m)| {
                let t = String::from_utf8(m.payload.clone()).unwrap();
                let mut it = t.split('\0');
                (
                    *c,
                    it.next().unwrap().to_owned(),
                    it.next().unwrap().to_owned(),
                )
            })
            .collect()
    }

    pub fn watch(&mut self, c: ConnId, path: &str, token: &str) {
        let out = self.send(c, MsgType::Watch, 0, &s(&[path, token]));
        assert_eq!(out[0].1.payload, b"OK\0", "{}", out[0].1);
    }

    pub fn write_events(
        &mut self,
        c: ConnId,
        path: &str,
        v: &str,
    ) -> Vec<(ConnId, String, String)> {
        let mut p = s(&[path]);
        p.extend_from_slice(v.as_bytes());
        let out = self.send(c, MsgType::Write, 0, &p);
        assert!(out[0].1.as_error().is_none());
        H::events(&out)
    }

    pub fn tx_start(&mut self, c: ConnId) -> u32 {
        let r = self.ok(c, MsgType::TransactionStart, b"\0");
        String::from_utf8(r)
            .unwrap()
            .trim_end_matches('\0')
            .parse()
            .unwrap()
    }
}
