#!/usr/bin/python3
"""A second language drives callsession: Python stubs, generated here from
protos/ with Debian's grpc_tools, run a whole lifecycle against the real
callsessiond and check TAPI errors, including the ErrorInfo details.

    lifecycle_test.py CALLSESSIOND PROTOS_DIR
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

PROVIDER_TOKEN = "python-provider-token"


def generate_stubs(protos, out):
    files = [os.path.join(root, name)
             for sub in ("callsession/v1", "google/rpc")
             for root, _, names in os.walk(os.path.join(protos, sub))
             for name in names if name.endswith(".proto")]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", protos,
                    "--python_out=" + out, "--grpc_python_out=" + out] + files, check=True)


class LifecycleTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # The default, durable store, in a directory of its own.
        cls.data_dir = tempfile.mkdtemp(prefix="callsession-python-")
        cls.server = subprocess.Popen(
            [SERVER, "--listen=127.0.0.1:0", "--data_dir=" + cls.data_dir],
            stderr=subprocess.PIPE, text=True,
            env={"CALLSESSION_PROVIDER_TOKEN": PROVIDER_TOKEN})
        for line in cls.server.stderr:
            entry = json.loads(line)
            if entry["event"] == "listening":
                cls.address = entry["address"]
                break
        cls.channel = grpc.insecure_channel(cls.address)
        cls.app = service_grpc.CallSessionServiceStub(cls.channel)
        cls.provider = provider_grpc.ProviderServiceStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        cls.server.terminate()
        assert cls.server.wait(timeout=30) == 0
        shutil.rmtree(cls.data_dir)

    def call(self, method, request, token):
        return method(request, metadata=[("authorization", "Bearer " + token)], timeout=5)

    def tapi_reason(self, error):
        """The ErrorInfo reason in the grpc-status-details-bin trailer."""
        for key, value in error.trailing_metadata():
            if key == "grpc-status-details-bin":
                status = status_pb2.Status.FromString(value)
                for detail in status.details:
                    info = error_details_pb2.ErrorInfo()
                    if detail.Unpack(info):
                        return info.reason
        return ""

    def test_whole_lifecycle(self):
        init = self.app.Initialize(service.InitializeRequest(app_name="python"), timeout=5)
        token = init.app_token
        self.assertGreater(init.num_devices, 0)
        line = self.call(self.app.LineOpen, service.LineOpenRequest(
            device_id=0, privileges=[types.CALL_PRIVILEGE_OWNER]), token).line_handle

        call = self.call(self.app.MakeCall, service.MakeCallRequest(
            line_handle=line, dest_address="+15550100"), token)
        info = self.call(self.app.GetCallInfo,
                         service.GetCallInfoRequest(call_handle=call.call_handle), token).info
        self.assertEqual(info.called_id, "+15550100")
        self.assertEqual(info.origin, types.CALL_ORIGIN_OUTBOUND)
        self.assertEqual(info.call_id, call.call_id)

        self.call(self.provider.SetCallState, provider.SetCallStateRequest(
            call_id=call.call_id, call_state=types.CALL_STATE_CONNECTED), PROVIDER_TOKEN)
        self.call(self.app.Drop, service.DropRequest(call_handle=call.call_handle), token)
        status = self.call(self.app.GetCallStatus,
                           service.GetCallStatusRequest(call_handle=call.call_handle),
                           token).status
        self.assertEqual(status.call_state, types.CALL_STATE_IDLE)
        self.call(self.app.DeallocateCall,
                  service.DeallocateCallRequest(call_handle=call.call_handle), token)

        with self.assertRaises(grpc.RpcError) as gone:
            self.call(self.app.GetCallInfo,
                      service.GetCallInfoRequest(call_handle=call.call_handle), token)
        self.assertEqual(gone.exception.code(), grpc.StatusCode.NOT_FOUND)
        self.assertTrue(gone.exception.details().startswith("LINEERR_INVALCALLHANDLE: "))
        self.assertEqual(self.tapi_reason(gone.exception), "LINEERR_INVALCALLHANDLE")

        self.call(self.app.LineClose, service.LineCloseRequest(line_handle=line), token)
        self.call(self.app.Shutdown, service.ShutdownRequest(), token)
        with self.assertRaises(grpc.RpcError) as void:
            self.call(self.app.LineOpen, service.LineOpenRequest(device_id=0), token)
        self.assertEqual(void.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        self.assertEqual(self.tapi_reason(void.exception), "LINEERR_UNINITIALIZED")

    def test_inbound_call_arrives_as_events(self):
        token = self.app.Initialize(service.InitializeRequest(app_name="events"),
                                    timeout=5).app_token
        self.call(self.app.LineOpen, service.LineOpenRequest(
            device_id=1, privileges=[types.CALL_PRIVILEGE_OWNER]), token)
        call_id = self.call(self.provider.OfferCall, provider.OfferCallRequest(
            device_id=1, caller_id="+15550111"), PROVIDER_TOKEN).call_id
        stream = self.app.WatchEvents(service.WatchEventsRequest(),
                                      metadata=[("authorization", "Bearer " + token)], timeout=5)
        first, second = next(stream).event, next(stream).event
        stream.cancel()
        self.assertEqual(first.app_new_call.call_id, call_id)
        self.assertEqual(first.app_new_call.call_privilege, types.CALL_PRIVILEGE_OWNER)
        self.assertEqual(second.call_state.call_state, types.CALL_STATE_OFFERING)
        self.assertGreater(second.sequence, first.sequence)
        self.call(self.app.Answer, service.AnswerRequest(
            call_handle=first.app_new_call.call_handle), token)


if __name__ == "__main__":
    SERVER, PROTOS = sys.argv[1], sys.argv[2]
    stubs = tempfile.mkdtemp(prefix="callsession-py-")
    generate_stubs(PROTOS, stubs)
    sys.path.insert(0, stubs)
    import grpc  # noqa: E402
    from callsession.v1 import call_session_service_pb2 as service  # noqa: E402
    from callsession.v1 import call_session_service_pb2_grpc as service_grpc  # noqa: E402
    from callsession.v1 import provider_service_pb2 as provider  # noqa: E402
    from callsession.v1 import provider_service_pb2_grpc as provider_grpc  # noqa: E402
    from callsession.v1 import types_pb2 as types  # noqa: E402
    from google.rpc import error_details_pb2, status_pb2  # noqa: E402
    unittest.main(argv=sys.argv[:1], verbosity=2)
