//! Properties of the framing scan over generated pipelines of requests: whatever the read
//! boundaries, every head gets the verdict its framing headers call for, in order, and the
//! scan stops after a refusal or an upgrade. A scan that lost its place in a body (a fixed
//! length, a chunk, trailers) would judge body bytes as heads, or miss the head after.

use proptest::prelude::*;

use super::*;

/// How a generated request is framed, and so what the scan must say of it.
#[derive(Clone, Debug)]
enum Framing {
    None,
    Fixed(Vec<u8>),
    /// Chunks, then trailer lines.
    Chunked(Vec<Vec<u8>>, Vec<String>),
    /// `Content-Length` and `Transfer-Encoding` both.
    Both,
    /// `Content-Length` twice, equal.
    TwoLengths,
    /// `Upgrade`: the scan stops after this head.
    Upgrade,
}

#[derive(Clone, Debug)]
struct Request {
    blank_lines: Vec<&'static str>,
    crlf: bool,
    upper: bool,
    fillers: Vec<(String, String)>,
    framing: Framing,
}

/// Body bytes that look like heads, line ends and chunk sizes, to lead a lost scan astray.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"\r\n".to_vec()),
        Just(b"\r\n\r\n".to_vec()),
        Just(b"GET / HTTP/1.1\r\nContent-Length: 1\r\n\r\n".to_vec()),
        Just(b"0\r\n\r\n".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..12),
    ];
    proptest::collection::vec(piece, 0..4).prop_map(|p| p.concat())
}

fn framing() -> impl Strategy<Value = Framing> {
    let trailer = "[a-z]{1,6}: [a-z0-9]{0,6}";
    let nonempty = body().prop_filter("a chunk has bytes", |b| !b.is_empty());
    prop_oneof![
        3 => Just(Framing::None),
        3 => body().prop_map(Framing::Fixed),
        3 => (
            proptest::collection::vec(nonempty, 0..4),
            proptest::collection::vec(trailer, 0..3),
        )
            .prop_map(|(chunks, trailers)| Framing::Chunked(chunks, trailers)),
        1 => Just(Framing::Both),
        1 => Just(Framing::TwoLengths),
        1 => Just(Framing::Upgrade),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (
        proptest::collection::vec(prop_oneof![Just("\r\n"), Just("\n")], 0..2),
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(("x-[a-z]{1,8}", "[ -~]{0,16}"), 0..3),
        framing(),
    )
        .prop_map(|(blank_lines, crlf, upper, fillers, framing)| Request {
            blank_lines,
            crlf,
            upper,
            fillers,
            framing,
        })
}

impl Request {
    fn bytes(&self) -> Vec<u8> {
        let eol = if self.crlf { "\r\n" } else { "\n" };
        let name = |n: &str| match self.upper {
            true => n.to_ascii_uppercase(),
            false => n.to_string(),
        };
        let mut head = self.blank_lines.concat();
        head += &format!("POST /p HTTP/1.1{eol}Host: a{eol}");
        for (n, v) in &self.fillers {
            head += &format!("{n}: {}{eol}", v.trim());
        }
        let mut body = Vec::new();
        match &self.framing {
            Framing::None => {}
            Framing::Fixed(b) => {
                head += &format!("{}: {}{eol}", name("content-length"), b.len());
                body.extend_from_slice(b);
            }
            Framing::Chunked(chunks, trailers) => {
                head += &format!("{}: chunked{eol}", name("transfer-encoding"));
                for (i, c) in chunks.iter().enumerate() {
                    let size = match i % 2 {
                        0 => format!("{:x}", c.len()),
                        _ => format!("{:X};ext=1", c.len()),
                    };
                    body.extend_from_slice(format!("{size}\r\n").as_bytes());
                    body.extend_from_slice(c);
                    body.extend_from_slice(b"\r\n");
                }
                body.extend_from_slice(b"0\r\n");
                for t in trailers {
                    body.extend_from_slice(format!("{t}\r\n").as_bytes());
                }
                body.extend_from_slice(b"\r\n");
            }
            Framing::Both => {
                head += &format!("Content-Length: 3{eol}Transfer-Encoding: chunked{eol}");
            }
            Framing::TwoLengths => head += &format!("Content-Length: 0{eol}content-length: 0{eol}"),
            Framing::Upgrade => head += &format!("{}: websocket{eol}", name("upgrade")),
        }
        head += eol;
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&body);
        bytes
    }
}

/// What the scan must say of a pipeline: a verdict per head up to and including the first
/// refused or upgrading one.
fn expected(requests: &[Request]) -> Vec<Verdict> {
    let mut out = Vec::new();
    for r in requests {
        let (verdict, stop) = match r.framing {
            Framing::Both => (
                Verdict::Refuse("both content-length and transfer-encoding"),
                true,
            ),
            Framing::TwoLengths => (Verdict::Refuse("more than one content-length"), true),
            Framing::Upgrade => (Verdict::Clean, true),
            _ => (Verdict::Clean, false),
        };
        out.push(verdict);
        if stop {
            break;
        }
    }
    out
}

fn scan_in_pieces(bytes: &[u8], mut cuts: Vec<usize>) -> Vec<Verdict> {
    cuts.push(0);
    cuts.push(bytes.len());
    cuts.sort_unstable();
    cuts.dedup();
    let seen = Arc::new(Seen::default());
    let mut scan = Scan::new((), Bytes::new(), 65_536, seen.clone());
    for w in cuts.windows(2) {
        scan.feed(&bytes[w[0]..w[1]]);
    }
    std::iter::from_fn(|| seen.next()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_head_gets_its_verdict_whatever_the_read_boundaries(
        requests in proptest::collection::vec(request(), 1..5),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let bytes: Vec<u8> = requests.iter().flat_map(Request::bytes).collect();
        let want = expected(&requests);
        prop_assert_eq!(&scan_in_pieces(&bytes, Vec::new()), &want, "in one read");
        let cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        prop_assert_eq!(&scan_in_pieces(&bytes, cuts.clone()), &want, "cut at {:?}", cuts);
    }

    #[test]
    fn a_pipeline_read_a_byte_at_a_time_gets_the_same_verdicts(
        requests in proptest::collection::vec(request(), 1..4),
    ) {
        let bytes: Vec<u8> = requests.iter().flat_map(Request::bytes).collect();
        prop_assert_eq!(scan_in_pieces(&bytes, (1..bytes.len()).collect()), expected(&requests));
    }
}
