//! The RESP endpoint of real `grapevine start` processes: started after the member, reachable on
//! `--resp-port`, keys written through one process read through another, a SIGKILLed member
//! (its clients get errors, the others' acknowledged SETs survive), and a graceful stop that
//! closes the endpoint before the member leaves.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

fn connect(addr: SocketAddr) -> redis::Connection {
    let client = redis::Client::open(format!("redis://{addr}/")).unwrap();
    let con = client.get_connection_with_timeout(Duration::from_secs(5)).expect("connects");
    con.set_read_timeout(Some(Duration::from_secs(25))).unwrap();
    con.set_write_timeout(Some(Duration::from_secs(25))).unwrap();
    con
}

#[test]
fn three_processes_serve_resp_survive_a_sigkill_and_stop_the_endpoint_gracefully() {
    let members = "127.0.0.1:27321-27323";
    let mut env = FAST_TIMERS.to_vec();
    env.push(("GRAPEVINE_PORT_AUTO_INCREMENT", "false"));
    let mut nodes: Vec<Node> = (1..=3u16)
        .map(|i| {
            let (port, admin, resp, id) =
                ((27320 + i).to_string(), (28320 + i).to_string(), (29320 + i).to_string(), format!("resp{i}"));
            let args = [
                "start",
                "--cluster-name",
                "resp",
                "--bind",
                "127.0.0.1",
                "--port",
                &port,
                "--admin-port",
                &admin,
                "--resp-port",
                &resp,
                "--node-id",
                &id,
                "--members",
                members,
            ];
            Node::spawn(&id, &args, &env)
        })
        .collect();
    let admins: Vec<u16> = nodes.iter_mut().map(Node::admin_port).collect();
    let resp: Vec<SocketAddr> = nodes.iter_mut().map(Node::resp_addr).collect();
    assert_eq!(resp[0], "127.0.0.1:29321".parse().unwrap(), "--resp-port is used as given");
    wait_for_agreement(&admins, 3);

    let mut writer = connect(resp[1]);
    for i in 0..300 {
        let () = redis::cmd("SET").arg(format!("k{i}")).arg(i).query(&mut writer).expect("SET acknowledged");
    }
    let mut reader = connect(resp[2]);
    let value: i64 = redis::cmd("GET").arg("k42").query(&mut reader).unwrap();
    assert_eq!(value, 42, "written through one process, read through another");

    let mut doomed = connect(resp[0]);
    let pong: String = redis::cmd("PING").query(&mut doomed).unwrap();
    assert_eq!(pong, "PONG");
    nodes[0].signal("KILL");
    nodes[0].wait_exit(WAIT);
    let after_kill: redis::RedisResult<String> = redis::cmd("PING").query(&mut doomed);
    assert!(after_kill.is_err(), "a client of the killed member gets an error, not a hang");

    // Every acknowledged SET is readable through the others once they took over; until then a
    // read gets an answer or an error within the read timeout, never hangs.
    wait_until("every acknowledged SET to be readable after the kill", WAIT, || {
        (0..300)
            .all(|i| {
                let got: redis::RedisResult<Option<i64>> = redis::cmd("GET").arg(format!("k{i}")).query(&mut reader);
                match got {
                    Ok(value) => {
                        assert_eq!(value, Some(i), "acknowledged SET k{i} lost");
                        true
                    }
                    Err(e) if e.is_timeout() => panic!("GET k{i} hung for 25 s"),
                    Err(_) => {
                        reader = connect(resp[2]);
                        false
                    }
                }
            })
            .then_some(())
    });
    let () = redis::cmd("SET").arg("after").arg("kill").query(&mut writer).expect("writes go on");

    // A graceful stop closes the RESP endpoint, then leaves; the process exits 0.
    nodes[1].signal("TERM");
    let status = nodes[1].wait_exit(WAIT);
    assert!(status.success(), "{status}");
    assert!(std::net::TcpStream::connect_timeout(&resp[1], Duration::from_secs(1)).is_err(), "the endpoint is gone");
    assert!(nodes[1].log().contains("RESP endpoint listening"));
    let value: String = redis::cmd("GET").arg("after").query(&mut reader).expect("the last member serves");
    assert_eq!(value, "kill");
}

#[test]
fn a_taken_resp_port_stops_the_member_with_a_message_naming_the_range() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let env = [("GRAPEVINE_PORT_AUTO_INCREMENT", "false"), ("GRAPEVINE_RESP_PORT", port.as_str())];
    let out = run(
        &["start", "--cluster-name", "resp-taken", "--bind", "127.0.0.1", "--port", "0", "--admin-port", "0"],
        &env,
    );
    assert_eq!(out.status.code(), Some(1), "{}", clean_stderr(&out));
    let stderr = clean_stderr(&out);
    assert!(stderr.contains(&format!("no free RESP port in 127.0.0.1:{port}-{port}")), "{stderr}");
    assert!(stderr.contains("resp_enabled = false"), "says how to turn it off: {stderr}");
}
